# Sourced by the scripts that run the llama.cpp peer. On CPUs with AMX,
# llama.cpp puts Q4_1 and Q8_0 weights in its AMX buffer type ("repack" in
# its flags). Where that path cannot run — on the KVM guests of this machine
# kind its AMX kernel dies with SIGILL at its first tile instruction
# (llama.cpp b0c1e57, seen 2026-12-07), while AMX itself works there — the
# peer runs without it, on the same AVX-512 VNNI kernels it uses on every
# other x86 CPU. (On x86, llama.cpp repacks no Q4_1 or Q8_0 weights
# otherwise, so the flag changes nothing else for these models.)
#
# llama_extra_bufts_work BIN MODEL THREADS: 0 if llama-bench runs a short
# prompt with llama.cpp's defaults, 1 if it does not.
llama_extra_bufts_work() {
  LD_LIBRARY_PATH="$1${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    "$1/llama-bench" -m "$2" -t "$3" -r 1 -p 32 -n 0 > /dev/null 2>&1
}
