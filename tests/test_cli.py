"""The vbs command as a user runs it (on a machine without CUDA: the CI machine)."""

import shutil
import subprocess
import sys

import pytest
import torch

VBS = [shutil.which("vbs")] if shutil.which("vbs") else [sys.executable, "-m", "vllm_blackwell_sparse.cli"]


def run(*args):
    return subprocess.run(VBS + list(args), capture_output=True, text=True, timeout=300)


def test_doctor_reports_versions_entry_point_and_kernels():
    out = run("doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    for text in ("vLLM             0.26", "nvidia-cutlass-dsl", "blackwell_sparse = vllm_blackwell_sparse:register",
                 "CUSTOM -> vllm_blackwell_sparse.backend.BlackwellSparseBackend", "FA4 (vllm.vllm_flash_attn.cute)", "BLASST decode",
                 "DSA indexer hook armed", '"gvr_topk": true'):
        assert text in out.stdout, out.stdout


def test_doctor_fails_on_invalid_config(monkeypatch):
    monkeypatch.setenv("VBS_GVR_TOPK", "perhaps")
    out = run("doctor")
    assert out.returncode == 1 and "INVALID" in out.stdout and "VBS_GVR_TOPK" in out.stdout


def test_doctor_fails_on_a_setting_startup_refuses_and_names_typos(monkeypatch):
    monkeypatch.setenv("VBS_PREFILL_THRESHOLD_SCALE_FACTOR", "10")
    monkeypatch.setenv("VBS_GVR_TOPKK", "1")
    out = run("doctor")
    assert out.returncode == 1, out.stdout
    assert "REFUSED at start-up" in out.stdout and "no BLASST prefill kernel" in out.stdout
    assert "VBS_GVR_TOPKK is set but means nothing" in out.stdout and "did you mean VBS_GVR_TOPK?" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="what doctor says without a GPU")
def test_doctor_says_what_this_machine_cannot_run():
    out = run("doctor")
    line = next(line for line in out.stdout.splitlines() if "BLASST decode (kernels/blasst_decode/)" in line)
    assert "unavailable here: no CUDA device" in line
    assert "dense attention (prefill; plain decode)" in out.stdout and "FA3 on sm90" in out.stdout
    assert " INFO " not in out.stdout + out.stderr  # vLLM's own INFO lines stay out of the report


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback of the demo")
def test_demo_without_cuda_runs_the_oracle_demonstration():
    out = run("demo")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no CUDA device" in out.stdout
    assert "BLASST oracle" in out.stdout and "exact: True" in out.stdout and "exact: False" not in out.stdout


def test_demo_uses_the_real_model_where_it_is_prepared(tmp_path, monkeypatch):
    import json

    from vllm_blackwell_sparse import demo

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fields, label = demo.demo_model()
    assert fields == {} and "tiny dummy-weight Llama" in label and "vbs model prepare" in label
    ckpt = tmp_path / "vllm-blackwell-sparse" / "models" / "smollm2-135m-instruct"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "vbs_provenance.json").write_text(json.dumps({"label": "Q4_1 GGUF dequantized to bf16", "source": "gguf"}))
    fields, label = demo.demo_model()
    assert fields["model"] == str(ckpt) and fields["load_format"] == "auto"
    assert "Q4_1 GGUF dequantized to bf16" in label


@pytest.mark.skipif(torch.cuda.is_available(), reason="what the examples say without a GPU")
@pytest.mark.parametrize("example", ["offline_tiny_llama.py", "offline_dsa_gvr.py", "serve_tiny_llama.sh"])
def test_examples_say_they_need_a_gpu(example):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / example
    cmd = ["bash", str(path)] if example.endswith(".sh") else [sys.executable, str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "GPU" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_every_option_has_help_and_numbers_are_checked():
    from vllm_blackwell_sparse.cli import build_parser

    parser, parsers = build_parser()
    for path, p in parsers.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (path, action.option_strings)
    for args, fragment in [(["demo", "--max-tokens", "0"], "--max-tokens: expected an integer >= 1"),
                           (["bench", "decode", "--sparsities", "1.5"], "expected fractions in (0, 1]"),
                           (["bench", "serve", "--cells", "8x"], "expected BATCHxTOKENS"),
                           (["demo", "--bogus"], "vbs demo: error: unrecognized arguments: --bogus")]:
        out = run(*args)
        assert out.returncode == 2 and fragment in out.stderr, out.stderr
    assert run("--version").stdout.startswith("vbs (vllm-blackwell-sparse) ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback of the demo")
def test_cpu_demo_honours_json(tmp_path):
    import json

    target = tmp_path / "new" / "demo.json"
    out = run("demo", "--cpu", "--json", str(target))
    assert out.returncode == 0, out.stderr
    report = json.loads(target.read_text())
    assert report["blasst"] and all(g["exact"] for g in report["gvr"])
