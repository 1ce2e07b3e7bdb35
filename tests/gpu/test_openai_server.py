"""`vllm serve`-equivalent OpenAI server with --attention-backend CUSTOM answers /v1/completions.

Started as `python3 -m vllm.entrypoints.openai.api_server` (the H200 host has no console
scripts), bound to 127.0.0.1 only; every wait is bounded and the server is always stopped.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from vllm_blackwell_sparse.demo import TINY_LLAMA_DIR

STARTUP_TIMEOUT_S = 420


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, base, log_path):
    """Poll /health until the server answers (bounded; fails with the log's tail)."""
    deadline = time.time() + STARTUP_TIMEOUT_S
    while True:
        assert proc.poll() is None, "server exited:\n" + log_path.read_text()[-5000:]
        try:
            if urllib.request.urlopen(base + "/health", timeout=5).status == 200:
                return
        except OSError:
            pass
        assert time.time() < deadline, "server not healthy in time:\n" + log_path.read_text()[-5000:]
        time.sleep(3)


def stop(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_server_with_custom_backend_answers_completions(tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(TINY_LLAMA_DIR),
        "--load-format", "dummy", "--host", "127.0.0.1", "--port", str(port), "--attention-backend", "CUSTOM",
        "--max-model-len", "4096", "--gpu-memory-utilization", "0.3", "--enforce-eager",
        "--additional-config", json.dumps({"blackwell_sparse": {}}),
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, tmp_path / "server.log")
        body = json.dumps(
            {"model": str(TINY_LLAMA_DIR), "prompt": "Long-context serving spends", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        ).encode()
        req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
        text = reply["choices"][0]["text"]
        print("completion:", repr(text), reply.get("usage"))
        assert isinstance(text, str) and text.strip()
        assert reply["usage"]["completion_tokens"] == 16
        server_log = (tmp_path / "server.log").read_text()
        # vLLM's own selection log lines (the command line alone would also say CUSTOM).
        assert "Using AttentionBackendEnum.CUSTOM backend" in server_log
        assert "Setting kv cache block size to 128 for CUSTOM backend" in server_log  # the preferred size
        if os.environ.get("VBS_TEST_ARTIFACTS"):
            with open(os.path.join(os.environ["VBS_TEST_ARTIFACTS"], "server_reply.json"), "w") as f:
                json.dump(reply, f, indent=1)
    finally:
        stop(proc)
        log.close()
