"""One engine in its own Python process: the serving benchmark and the evaluation tools run
each configuration this way (a fresh CUDA context, nothing left from the previous engine)."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path


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
