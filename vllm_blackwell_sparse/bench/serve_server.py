"""``vbs bench serve --server``: the same figures through vLLM's OpenAI server.

For each configuration one server process (``python -m vllm.entrypoints.openai.api_server``
on 127.0.0.1; ``vllm serve`` is the same for users), then per cell a bounded load
generator: ``batch`` streaming ``/v1/completions`` requests sent at once, one thread each,
prompts as token ids (disjoint slices of real text). Client-side TTFT, TPOT (from the
chunk arrival times in the window where every stream is running), and the skipped
fraction from the server's own log (``VBS_BLASST_STATS`` lines, logged every 2 s).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from vllm_blackwell_sparse.bench.engine_process import decode_graphs_compilation
from vllm_blackwell_sparse.bench.serve import DEFAULT_CELLS, corpus_token_slices, engine_env, engine_specs

STATS_LINE = re.compile(r"BLASST decode: ([0-9.]+)% of (\d+) eligible tiles skipped")
HEALTH_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(spec, port: int, log_path: Path) -> subprocess.Popen:
    env = engine_env(spec)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server runs its engine core in its own process
    env["VBS_BLASST_STATS_INTERVAL"] = "2"
    batches = sorted({c[0] for c in spec.cells})
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", spec.model, "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "m", "--attention-backend", spec.backend,
           "--dtype", "bfloat16", "--block-size", str(spec.block_size), "--max-model-len", str(spec.max_model_len),
           "--gpu-memory-utilization", str(spec.gpu_memory_utilization), "--max-num-seqs", str(max(batches)),
           "--max-num-batched-tokens", str(spec.max_num_batched_tokens), "--generation-config", "vllm", "--seed", "0"]
    if spec.enforce_eager:
        cmd.append("--enforce-eager")
    elif not spec.compile:
        cmd += ["--compilation-config", json.dumps(decode_graphs_compilation({1, 2, 4, 8} | set(batches)))]
    return subprocess.Popen(cmd, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = HEALTH_TIMEOUT_S) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was healthy")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return time.time() - t0
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server was not healthy after {timeout:.0f} s")


def stream_completion(port: int, prompt: list[int], max_tokens: int) -> dict:
    """One streaming request; returns the send time and every chunk's arrival time."""
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "ignore_eos": True, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t_send = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        return {"error": f"HTTP {resp.status}: {resp.read()[:300]!r}"}
    chunks = []
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        data = json.loads(line[6:])
        if data.get("choices"):
            chunks.append(time.perf_counter())
    return {"t_send": t_send, "chunks": chunks}


def run_load(port: int, prompts: list[list[int]], max_tokens: int) -> dict:
    results = [None] * len(prompts)

    def worker(i):
        results[i] = stream_completion(port, prompts[i], max_tokens)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        return {"errors": errors[:3]}
    ttft = [(r["chunks"][0] - r["t_send"]) * 1e3 for r in results if r["chunks"]]
    # The window in which every stream is running: after the last first chunk, before the first last chunk.
    start = max(r["chunks"][0] for r in results)
    end = min(r["chunks"][-1] for r in results)
    tpot = []
    for r in results:
        inside = [t for t in r["chunks"] if start <= t <= end]
        if len(inside) > 1:
            tpot.append((inside[-1] - inside[0]) / (len(inside) - 1) * 1e3)
    return {"ttft_median_ms": statistics.median(ttft), "ttft_max_ms": max(ttft),
            "tpot_ms": statistics.median(tpot) if tpot else float("nan"),
            "tokens": sum(len(r["chunks"]) for r in results), "window_s": end - start}


def server_sparsity(log_path: Path) -> dict | None:
    """The server log's BLASST lines, summed (skipped share weighted by eligible tiles)."""
    skipped = eligible = 0
    lines = 0
    for m in STATS_LINE.finditer(log_path.read_text(errors="replace")):
        share, n = float(m.group(1)) / 100, int(m.group(2))
        skipped += share * n
        eligible += n
        lines += 1
    return {"sparsity": skipped / eligible, "eligible_tiles": eligible, "log_lines": lines} if eligible else None


def main(args, model: str) -> int:
    from transformers import AutoTokenizer

    from vllm_blackwell_sparse.bench.topk import environment

    cells = args.cells or DEFAULT_CELLS[:1]
    specs = engine_specs(model, cells, args.factors, args.max_tokens, compile=args.compile)
    if args.only:
        specs = [s for s in specs if any(o in s.name for o in args.only)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model)
    result = {"environment": environment(), "command": " ".join(sys.argv), "mode": "openai-server", "model": model,
              "engines": []}
    offset = 0
    for spec in specs:
        port = _free_port()
        log_path = out.with_name(out.stem + f"_{len(result['engines'])}.log")
        print(f"{spec.name}: starting the OpenAI server on 127.0.0.1:{port} (log {log_path})", flush=True)
        proc = start_server(spec, port, log_path)
        entry = {"spec": {"name": spec.name, "backend": spec.backend, "factor": spec.factor}, "cells": []}
        try:
            entry["healthy_after_s"] = wait_healthy(port, proc)
            for b, n in spec.cells:
                lengths = [n] * b
                slices = corpus_token_slices(tok, [offset + 1] + lengths)[1:]  # fresh text per cell and server
                offset += sum(lengths)
                load = run_load(port, slices, spec.max_tokens)
                load.update(batch=b, prompt_tokens=n)
                entry["cells"].append(load)
                print(f"  {spec.name}: B{b} x {n}: {load}", flush=True)
            time.sleep(3)  # one more stats interval
        except Exception as e:  # noqa: BLE001 - recorded; the next configuration still runs
            entry["error"] = f"{type(e).__name__}: {e}"
            print(f"  {spec.name} FAILED: {entry['error']}", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        entry["server_sparsity"] = server_sparsity(log_path)
        entry["log_stats_lines"] = [line for line in log_path.read_text(errors="replace").splitlines()
                                    if "BLASST decode:" in line][-5:]
        result["engines"].append(entry)
        out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0
