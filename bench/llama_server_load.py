#!/usr/bin/env python3
"""The `mnemo-bench serve` workload against llama.cpp's llama-server.

N client threads, each holding one conversation, run T chat turns through
/v1/chat/completions with streaming (SSE). A conversation resends its history
each turn, as OpenAI-style servers require; llama-server's prompt cache keeps
the prefix, which is the closest match to a mnemo session. With
--long-prompt-tokens an extra client sends one long prompt once half the
turns are done, and the inter-token gaps of the others are split by whether
they overlapped its prefill. Prompts are those of bench/serve_bench.cc.

Standard library only. Prints one JSON object with the keys of
`mnemo-bench serve --json` that matter for the comparison.
"""
import argparse
import http.client
import json
import math
import sys
import threading
import time

# Identical to bench/serve_bench.cc.
TOPICS = [
    "a lighthouse keeper who finds a message in a bottle",
    "a robot learning to paint in an abandoned city",
    "two rival bakers in a small mountain village",
    "a cartographer mapping an island that keeps changing",
    "a young astronaut on her first trip to Mars",
    "a detective solving a mystery on a night train",
    "a dragon who is afraid of heights",
    "a musician who can hear the thoughts of trees",
]
FILLER = ["river", "stone", "window", "garden", "morning", "letter", "candle", "forest",
          "bridge", "harbor", "winter", "market", "lantern", "valley", "meadow", "tower"]


def filler(words):
    return " ".join(FILLER[i % len(FILLER)] for i in range(words))


def turn_prompt(client, turn, pad_tokens):
    p = "Write a long story about " if turn == 0 else "Continue the story, adding a new chapter about "
    p += TOPICS[(client + turn) % len(TOPICS)]
    p += ". Make it detailed and long."
    base = 20
    if pad_tokens > base:
        p += " Use these words: " + filler(pad_tokens - base) + "."
    return p


def long_prompt(tokens):
    return "Summarize the following list of words in one sentence: " + filler(max(tokens - 12, 1)) + "."


class Turn:
    def __init__(self):
        self.send_s = 0.0
        self.first_chunk_s = 0.0
        self.done_s = 0.0
        self.generated = 0
        self.prompt = 0
        self.finish = None
        self.text = ""


def chat(host, port, messages, max_tokens, temperature, seed, gaps):
    """One streamed turn; appends (start_s, end_s, per_token_ms, tokens) to gaps."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True}, "cache_prompt": True}
    if seed is not None:
        body["seed"] = seed
    turn = Turn()
    conn = http.client.HTTPConnection(host, port, timeout=3600)
    turn.send_s = time.monotonic()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError("HTTP %d: %s" % (resp.status, resp.read()[:300]))
    text = []
    chunks = 0
    last = 0.0
    usage = None
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        ev = json.loads(data)
        t = time.monotonic()
        for ch in ev.get("choices", []):
            content = (ch.get("delta") or {}).get("content")
            if content:
                chunks += 1
                text.append(content)
                if turn.first_chunk_s == 0:
                    turn.first_chunk_s = t
                elif gaps is not None:
                    gaps.append((last, t, (t - last) * 1e3, 1))
                last = t
            if ch.get("finish_reason"):
                turn.finish = ch["finish_reason"]
        if ev.get("usage"):
            usage = ev["usage"]
    turn.done_s = time.monotonic()
    conn.close()
    turn.text = "".join(text)
    turn.generated = usage.get("completion_tokens", chunks) if usage else chunks
    turn.prompt = usage.get("prompt_tokens", 0) if usage else 0
    return turn


def summarize(samples):
    """Nearest-rank p50/p99 over (value, weight) samples, as serve_bench.cc."""
    if not samples:
        return {"p50": 0, "p99": 0, "mean": 0, "count": 0}
    samples = sorted(samples)
    total = sum(w for _, w in samples)

    def rank(q):
        want = max(1, math.ceil(q * total))
        seen = 0
        for x, w in samples:
            seen += w
            if seen >= want:
                return x
        return samples[-1][0]

    return {"p50": rank(0.5), "p99": rank(0.99), "mean": sum(x * w for x, w in samples) / total, "count": total}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=0)
    ap.add_argument("--long-prompt-tokens", type=int, default=0)
    ap.add_argument("--long-max-tokens", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()

    lock = threading.Condition()
    state = {"turns_done": 0, "clients_done": 0}
    total_turns = args.clients * args.turns
    records = [{"turns": [], "gaps": [], "error": None} for _ in range(args.clients)]

    def run_client(i):
        rec = records[i]
        messages = []
        for t in range(args.turns):
            messages.append({"role": "user", "content": turn_prompt(i, t, args.prompt_tokens)})
            seed = None if args.seed is None else args.seed + i * 1000 + t
            try:
                turn = chat(args.host, args.port, messages, args.max_tokens, args.temperature, seed, rec["gaps"])
            except Exception as e:  # noqa: BLE001 - reported, not raised
                rec["error"] = "%s: %s" % (type(e).__name__, e)
                break
            finally:
                with lock:
                    state["turns_done"] += 1
                    lock.notify_all()
            rec["turns"].append(turn)
            messages.append({"role": "assistant", "content": turn.text})
        with lock:
            state["clients_done"] += 1
            lock.notify_all()

    long_rec = {"ran": False, "turn": None, "error": None}

    def run_long():
        with lock:
            lock.wait_for(lambda: state["turns_done"] * 2 >= total_turns or state["clients_done"] == args.clients)
            if state["clients_done"] == args.clients:
                return
        long_rec["ran"] = True
        try:
            long_rec["turn"] = chat(args.host, args.port, [{"role": "user", "content": long_prompt(args.long_prompt_tokens)}],
                                    args.long_max_tokens, args.temperature, args.seed, None)
        except Exception as e:  # noqa: BLE001
            long_rec["error"] = "%s: %s" % (type(e).__name__, e)

    threads = [threading.Thread(target=run_client, args=(i,)) for i in range(args.clients)]
    if args.long_prompt_tokens > 0:
        threads.append(threading.Thread(target=run_long))
    start = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - start

    lt = long_rec["turn"]
    window = None
    if lt is not None:
        end = lt.first_chunk_s or lt.done_s
        if end > lt.send_s:
            window = (lt.send_s, end)
    errors = 0
    first_error = None
    generated = prompt = 0
    finish = {}
    ttft, itl, during, outside = [], [], [], []
    for rec in records:
        if rec["error"]:
            errors += 1
            first_error = first_error or rec["error"]
        for t in rec["turns"]:
            generated += t.generated
            prompt += t.prompt
            finish[t.finish or "unknown"] = finish.get(t.finish or "unknown", 0) + 1
            if t.first_chunk_s:
                ttft.append(((t.first_chunk_s - t.send_s) * 1e3, 1))
        for start_s, end_s, ms, k in rec["gaps"]:
            itl.append((ms, k))
            if window:
                (during if start_s < window[1] and end_s > window[0] else outside).append((ms, k))
    if long_rec["error"]:
        errors += 1
        first_error = first_error or "long prompt: " + long_rec["error"]
    long_generated = lt.generated if lt is not None else 0
    out = {
        "server": "llama-server",
        "clients": args.clients,
        "turns": args.turns,
        "max_tokens": args.max_tokens,
        "prompt_tokens_target": args.prompt_tokens,
        "wall_s": wall,
        "requests": total_turns,
        "errors": errors,
        "generated_tokens": generated + long_generated,
        "prompt_tokens": prompt,
        "tokens_per_s": (generated + long_generated) / wall,
        "finish_reasons": finish,
        "ttft_ms": summarize(ttft),
        "inter_token_ms": summarize(itl),
    }
    if first_error:
        out["first_error"] = first_error
    if args.long_prompt_tokens > 0:
        lj = {"tokens_target": args.long_prompt_tokens, "ran": long_rec["ran"]}
        if lt is not None and window:
            lj["prompt_tokens"] = lt.prompt
            lj["prefill_ms"] = (window[1] - window[0]) * 1e3
            lj["inter_token_ms_during_prefill"] = summarize(during)
            lj["inter_token_ms_outside_prefill"] = summarize(outside)
        out["long_prompt"] = lj
    print(json.dumps(out, indent=2))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
