"""The installed plugin: entry point, register() contract, and what vLLM's loader does with it."""

import logging
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch

import vllm_blackwell_sparse.plugin as plugin
from vllm_blackwell_sparse.plugin import BACKEND_CLASS_PATH

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_registry():
    """Reset our idempotence guard and vLLM's CUSTOM override around a test."""
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum

    saved = dict(plugin._state), _ATTN_OVERRIDES.get(AttentionBackendEnum.CUSTOM)
    plugin._state.update(done=False, registered=False)
    _ATTN_OVERRIDES.pop(AttentionBackendEnum.CUSTOM, None)
    yield AttentionBackendEnum
    plugin._state.update(saved[0])
    if saved[1] is None:
        _ATTN_OVERRIDES.pop(AttentionBackendEnum.CUSTOM, None)
    else:
        _ATTN_OVERRIDES[AttentionBackendEnum.CUSTOM] = saved[1]


def test_entry_point_is_installed():
    eps = [ep for ep in metadata.entry_points(group="vllm.general_plugins") if ep.name == "blackwell_sparse"]
    assert len(eps) == 1
    assert eps[0].value == "vllm_blackwell_sparse:register"
    assert eps[0].load() is __import__("vllm_blackwell_sparse").register


def test_register_puts_our_backend_in_custom(fresh_registry):
    E = fresh_registry
    with pytest.raises(ValueError):
        E.CUSTOM.get_path()  # nothing registered yet
    assert plugin.register() is True
    assert E.CUSTOM.get_path() == BACKEND_CLASS_PATH
    cls = E.CUSTOM.get_class()
    assert cls.get_name() == "CUSTOM"
    assert E[cls.get_name()] is E.CUSTOM  # how vLLM maps the class back to the enum


def test_register_is_idempotent(fresh_registry):
    E = fresh_registry
    assert plugin.register() and plugin.register() and plugin.register()
    assert E.CUSTOM.get_path() == BACKEND_CLASS_PATH


def test_register_touches_no_cuda(fresh_registry, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("register() initialised CUDA")

    monkeypatch.setattr(torch.cuda, "_lazy_init", boom)
    monkeypatch.setattr(torch.cuda, "init", boom)
    monkeypatch.setattr(torch.cuda, "is_available", boom)
    monkeypatch.setattr(torch.cuda, "device_count", boom)
    assert plugin.register() is True
    assert not torch.cuda.is_initialized()


@pytest.fixture
def caplog(caplog):
    """pytest's caplog, also seeing vLLM's "vllm" logger (which does not propagate to the root)."""
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.addHandler(caplog.handler)
    yield caplog
    vllm_logger.removeHandler(caplog.handler)


def test_unsupported_vllm_version_registers_nothing_and_says_why(fresh_registry, monkeypatch, caplog):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.27.1")
    with caplog.at_level(logging.WARNING, logger="vllm.vllm_blackwell_sparse.plugin"):
        assert plugin.register() is False
    assert "vllm>=0.26.0,<0.27" in caplog.text and "0.27.1" in caplog.text and "NOT registered" in caplog.text
    with pytest.raises(ValueError):
        fresh_registry.CUSTOM.get_path()


@pytest.mark.parametrize(
    "version, ok",
    [("0.26.0", True), ("0.26.3", True), ("0.26.1.dev12+gabc", True), ("0.25.9", False), ("0.27.0", False), ("junk", False)],
)
def test_version_range(version, ok):
    assert plugin.vllm_version_supported(version) is ok


def test_register_logs_bad_or_unavailable_env_settings(fresh_registry, monkeypatch, caplog):
    monkeypatch.setenv("VBS_DECODE_THRESHOLD_SCALE_FACTOR", "-2")
    with caplog.at_level(logging.WARNING, logger="vllm.vllm_blackwell_sparse.plugin"):
        assert plugin.register() is True  # still registered: only a bad setting
    assert "VBS_DECODE_THRESHOLD_SCALE_FACTOR" in caplog.text and "stays registered" in caplog.text
    assert all(r.name.startswith("vllm.") and r.levelname == "ERROR" for r in caplog.records)


def test_register_names_misspelt_variables(fresh_registry, monkeypatch, caplog):
    monkeypatch.setenv("VBS_DECODE_THRESHOLD", "5")
    monkeypatch.setenv("VBS_GVR_TOPKK", "1")
    with caplog.at_level(logging.WARNING, logger="vllm.vllm_blackwell_sparse.plugin"):
        assert plugin.register() is True
    assert "VBS_GVR_TOPKK is set but is not one of our variables" in caplog.text
    assert "did you mean VBS_GVR_TOPK?" in caplog.text and "did you mean VBS_DECODE_THRESHOLD_SCALE_FACTOR?" in caplog.text


def test_register_never_raises(fresh_registry, monkeypatch, caplog):
    import vllm.v1.attention.backends.registry as registry

    def broken(*a, **k):
        raise RuntimeError("simulated registry failure")

    monkeypatch.setattr(registry, "register_backend", broken)
    with caplog.at_level(logging.WARNING, logger="vllm.vllm_blackwell_sparse.plugin"):
        assert plugin.register() is False
    assert "simulated registry failure" in caplog.text


LOADER = """
import torch
def _no_cuda(*a, **k):
    raise AssertionError("a plugin initialised CUDA")
torch.cuda._lazy_init = torch.cuda.init = _no_cuda
from vllm.plugins import load_general_plugins
from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum
load_general_plugins()
assert not torch.cuda.is_initialized()
print("CUSTOM=" + str(_ATTN_OVERRIDES.get(AttentionBackendEnum.CUSTOM)))
"""


@pytest.mark.parametrize(
    "vllm_plugins, expected",
    [(None, BACKEND_CLASS_PATH), ("blackwell_sparse", BACKEND_CLASS_PATH), ("", "None"), ("some_other_plugin", "None")],
)
def test_vllm_loader_finds_plugin_and_respects_VLLM_PLUGINS(vllm_plugins, expected):
    import os

    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    if vllm_plugins is not None:
        env["VLLM_PLUGINS"] = vllm_plugins
    out = subprocess.run([sys.executable, "-c", LOADER], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"CUSTOM={expected}" in out.stdout


def test_wheel_has_no_top_level_entrypoints_package(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("vllm_blackwell_sparse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "entrypoints" not in tops
    assert "vllm_blackwell_sparse" in tops
    assert "vllm_blackwell_sparse/models/tiny_llama/tokenizer.json" in names
    assert "vllm_blackwell_sparse/models/tiny_llama/config.json" in names
    ep_txt = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(ep_txt).decode()
    assert "[vllm.general_plugins]" in text and "blackwell_sparse = vllm_blackwell_sparse:register" in text
