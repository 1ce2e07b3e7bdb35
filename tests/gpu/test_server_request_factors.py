"""Per-request decode factors through the OpenAI server (real SmolLM2, 127.0.0.1 only):
``vllm_xargs`` carries ``vbs_decode_threshold_scale_factor``; a bad value is answered
400 naming the key; "off" skips nothing and 256 skips tiles, as the server's own
``VBS_BLASST_STATS`` log lines report. The engine's factor (1e9) skips nothing."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

from real_model import real_model_dir
from test_openai_server import _free_port, stop, wait_healthy

KEY = "vbs_decode_threshold_scale_factor"
STATS = re.compile(r"BLASST decode: ([0-9.]+)% of (\d+) eligible tiles skipped")


def _complete(base, model, xargs, prompt_ids):
    body = {"model": model, "prompt": prompt_ids, "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=120).read())


def _stats_after(log_path, mark):
    lines = open(log_path, errors="replace").read().splitlines()[mark:]
    return [(float(m.group(1)), int(m.group(2))) for m in map(STATS.search, lines) if m]


def test_server_takes_a_factor_per_request(tmp_path):
    model = real_model_dir()
    port = _free_port()
    log_path = tmp_path / "server.log"
    log = open(log_path, "w")
    env = dict(os.environ, VBS_DECODE_THRESHOLD_SCALE_FACTOR="1e9", VBS_BLASST_STATS="1", VBS_BLASST_STATS_INTERVAL="1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--attention-backend", "CUSTOM", "--max-model-len", "8192", "--block-size", "128",
           "--gpu-memory-utilization", "0.25", "--no-enable-prefix-caching",
           "--logits-processors", "vllm_blackwell_sparse.request_factors:DecodeFactorRows",
           "--compilation-config", json.dumps({"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"})]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, log_path)
        prompt = list(range(1000, 7000))  # token ids: 6,000 keys of context
        try:
            _complete(base, model, {KEY: "fast"}, prompt[:16])
            raise AssertionError("a bad factor was accepted")
        except urllib.error.HTTPError as e:
            body = e.read().decode()
            assert e.code == 400 and KEY in body, (e.code, body)
        seen = {}
        for setting in ("off", 256):
            time.sleep(2.5)
            mark = len(log_path.read_text(errors="replace").splitlines())
            reply = _complete(base, model, {KEY: setting}, prompt)
            assert reply["usage"]["completion_tokens"] == 32
            time.sleep(2.5)
            seen[setting] = _stats_after(log_path, mark)
        print(seen)
        assert seen["off"] and all(pct == 0.0 for pct, _ in seen["off"]), seen
        assert seen[256] and max(pct for pct, _ in seen[256]) > 0.0, seen
    finally:
        stop(proc)
        log.close()
        if os.environ.get("VBS_TEST_ARTIFACTS"):
            lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if "BLASST decode:" in ln]
            open(os.path.join(os.environ["VBS_TEST_ARTIFACTS"], "server_request_factors_stats.log"), "w").write(
                "\n".join(lines[-40:]) + "\n")
