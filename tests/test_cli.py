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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback of the demo")
def test_demo_without_cuda_runs_the_oracle_demonstration():
    out = run("demo")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no CUDA device" in out.stdout
    assert "BLASST oracle" in out.stdout and "exact: True" in out.stdout and "exact: False" not in out.stdout
