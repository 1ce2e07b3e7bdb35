"""One engine in its own Python process: the serving benchmark and the evaluation tools run
each configuration this way (a fresh CUDA context, nothing left from the previous engine)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path


def decode_graphs_compilation(capture_sizes) -> dict:
    """vLLM's compilation config of the tools' engines: no torch.compile (nothing compiles cold
    per configuration, and a factor given by environment variable changes nothing compiled),
    full CUDA graphs for decode steps at ``capture_sizes``, as a server replays them."""
    return {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": sorted(set(capture_sizes))}


def engine_environment(decode_factor: float | None = None, stats_interval: float | None = None) -> dict:
    """The environment of an engine worker: this process's, with the engine core in the
    worker's own process (so the worker reads the kernels' counters and buffers), our
    threshold and stats variables of the caller removed, and only the given ones set."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_ALLOW_INSECURE_SERIALIZATION="1",
               PYTHONUNBUFFERED="1")
    for key in ("VBS_DECODE_THRESHOLD_SCALE_FACTOR", "VBS_PREFILL_THRESHOLD_SCALE_FACTOR", "VBS_BLASST_STATS"):
        env.pop(key, None)
    if decode_factor is not None:
        env["VBS_DECODE_THRESHOLD_SCALE_FACTOR"] = repr(decode_factor)
    if stats_interval is not None:
        env.update(VBS_BLASST_STATS="1", VBS_BLASST_STATS_INTERVAL=f"{stats_interval:g}")
    return env


def worker_main(argv: list[str], spec_cls, run) -> int:
    """The worker side of :func:`run_json_worker`: ``SPEC_JSON OUT`` -> ``run(spec_cls(**spec))`` as JSON in OUT."""
    result = run(spec_cls(**json.loads(argv[0])))
    Path(argv[1]).write_text(json.dumps(result))
    return 0


def run_json_worker(module_args: list[str], spec: dict, env: dict, timeout: float, on_line=None) -> dict:
    """Run ``python -m MODULE [ARGS] SPEC_JSON OUT`` and return the JSON it wrote to OUT, or
    ``{"error", "log_tail"}``. Each line it prints goes to ``on_line``; past ``timeout``
    seconds it is killed (a silent hang included)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", *module_args, json.dumps(spec), str(out)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        killed = threading.Event()

        def kill():
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        tail: collections.deque[str] = collections.deque(maxlen=80)
        try:
            for line in proc.stdout:
                tail.append(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            proc.wait()
        finally:
            timer.cancel()
        if proc.returncode != 0 or not out.exists():
            why = f"killed after {timeout:g} s" if killed.is_set() else f"exit {proc.returncode}"
            return {"error": why, "log_tail": "".join(tail)[-6000:]}
        return json.loads(out.read_text())
