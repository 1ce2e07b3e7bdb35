"""The one-engine-per-process runner of the benchmark and evaluation drivers."""

import os

from vllm_blackwell_sparse.bench.engine_process import run_json_worker

WORKER = """
import json, sys, time
spec = json.loads(sys.argv[1])
print("  working on", spec["name"], flush=True)
if spec.get("hang"):
    time.sleep(60)
if spec.get("fail"):
    sys.exit(3)
open(sys.argv[2], "w").write(json.dumps({"echo": spec["name"]}))
"""


def _env(tmp_path):
    (tmp_path / "fake_worker.py").write_text(WORKER)
    return dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_result_and_lines(tmp_path):
    lines = []
    got = run_json_worker(["fake_worker"], {"name": "a"}, _env(tmp_path), 60, lines.append)
    assert got == {"echo": "a"} and lines == ["  working on a"]


def test_failure_and_silent_hang_are_reported(tmp_path):
    env = _env(tmp_path)
    failed = run_json_worker(["fake_worker"], {"name": "b", "fail": True}, env, 60)
    assert failed["error"] == "exit 3" and "working on b" in failed["log_tail"]
    hung = run_json_worker(["fake_worker"], {"name": "c", "hang": True}, env, 2)
    assert hung["error"] == "killed after 2 s"
