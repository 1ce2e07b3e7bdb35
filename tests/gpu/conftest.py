"""GPU tests run on the H200 (see docs/VERIFICATION.md); they skip cleanly elsewhere."""

import importlib.util

import pytest
import torch


def _real_vllm() -> str | None:
    """None when the real vLLM is importable, else why not (the `kernels` device bundle
    ships an empty `vllm` package that only carries FA4's sources)."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    try:
        import vllm

        if not getattr(vllm, "__version__", None) or importlib.util.find_spec("vllm.v1.attention.backend") is None:
            return "vllm is a stub package (no vllm.v1), not the real vLLM"
    except Exception as e:  # noqa: BLE001
        return f"importing vLLM failed: {type(e).__name__}: {e}"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None if torch.cuda.is_available() else "needs CUDA (GPU tests run on the H200)"
    reason = reason or _real_vllm()
    if reason:
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
                item.add_marker(skip)
