"""``vbs doctor``: what this machine can run, and whether vLLM will find the plugin."""

from __future__ import annotations

import importlib
import importlib.util
import platform
from importlib import metadata

from vllm_blackwell_sparse.plugin import BACKEND_CLASS_PATH, SUPPORTED_VLLM_TEXT, vllm_version_supported

ENTRY_POINT_GROUP = "vllm.general_plugins"
ENTRY_POINT_NAME = "blackwell_sparse"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def find_entry_point():
    """Our entry point as vLLM's plugin loader sees it, or None."""
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == ENTRY_POINT_NAME:
            return ep
    return None


def gpu_info() -> dict:
    """GPU name and capability; does not raise without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "reason": "torch.cuda.is_available() is False (no GPU or no driver)"}
    major, minor = torch.cuda.get_device_capability(0)
    return {
        "cuda": True,
        "name": torch.cuda.get_device_name(0),
        "capability": (major, minor),
        "arch": f"sm_{major}{minor}" + ("a" if major in (9, 10) else ""),
        "torch_cuda": torch.version.cuda,
    }


def kernel_availability(gpu: dict) -> dict[str, str]:
    """Which kernels this release can run here, each with a one-line reason."""
    from vllm_blackwell_sparse.features import BLASST_KERNEL_AVAILABLE

    out = {}
    if not gpu["cuda"]:
        fa4 = "unavailable: no CUDA device"
    elif gpu["capability"][0] == 9:
        fa4 = "available (sm90: verified on the H200)"
    elif gpu["capability"][0] == 10:
        fa4 = "available (sm100: selected by capability, not verified on hardware)"
    else:
        fa4 = f"unavailable: FA4 backend needs sm90 or sm100, this is {gpu['arch']}"
    if gpu["cuda"] and fa4.startswith("available"):
        try:
            importlib.import_module("vllm.vllm_flash_attn.cute.interface")
        except Exception as e:  # noqa: BLE001 - report whatever breaks the import
            fa4 = f"unavailable: importing vllm.vllm_flash_attn.cute failed: {type(e).__name__}: {e}"
    out["FA4 (vllm.vllm_flash_attn.cute)"] = fa4
    if gpu["cuda"] and gpu["capability"][0] in (9, 10):
        try:
            from vllm_blackwell_sparse.backend import dense_fa_version

            dense = f"FA{dense_fa_version()}"
        except Exception as e:  # noqa: BLE001 - report whatever breaks the import
            dense = f"unknown: {type(e).__name__}: {e}"
    elif not gpu["cuda"]:
        dense = "none here (no CUDA device); FA3 on sm90 where vLLM ships it, FA4 on sm100"
    else:
        dense = f"none here: the backend needs sm90 or sm100, this is {gpu['arch']}"
    out["dense attention (prefill; plain decode)"] = dense
    out["BLASST prefill"] = "not in this release" if not BLASST_KERNEL_AVAILABLE["prefill"] else "available"
    out["BLASST decode (kernels/blasst_decode/)"] = _blasst_decode_state(gpu)
    if gpu["cuda"] and gpu["capability"][0] in (9, 10):
        gvr = "available (exact; opt-in with gvr_topk for the DeepSeek-V3.2 indexer; runs where it measured faster than vLLM's top-k, vLLM's kernel elsewhere)"
        if importlib.util.find_spec("cutlass") is None:
            gvr = "unavailable: the CuTe DSL (nvidia-cutlass-dsl) is not installed"
    else:
        gvr = "unavailable: needs an sm90 / sm100 GPU"
    out["GVR top-k (kernels/gvr_topk.py)"] = gvr
    return out


def _blasst_decode_state(gpu: dict) -> str:
    from vllm_blackwell_sparse.envs import env_bool

    if not gpu["cuda"]:
        return "unavailable here: no CUDA device (runs on sm90; sm100 compile-checked only)"
    if importlib.util.find_spec("cutlass") is None:
        return "unavailable: the CuTe DSL (nvidia-cutlass-dsl) is not installed"
    major = gpu["capability"][0]
    if major == 9:
        return "available (sm90: verified on the H200)"
    if major == 10:
        if env_bool("VBS_ENABLE_UNVERIFIED_SM100"):
            return "available, UNVERIFIED (sm100: compile-checked only; VBS_ENABLE_UNVERIFIED_SM100=1)"
        return "off: sm100 is compile-checked only; VBS_ENABLE_UNVERIFIED_SM100=1 runs it unverified"
    return f"unavailable: needs sm90 or sm100, this is {gpu['arch']}"


def run_doctor() -> int:
    """Print the report; returns 0 when the plugin is usable here, 1 otherwise."""
    import torch

    ok = True
    print("vllm-blackwell-sparse doctor")
    print(f"  python           {platform.python_version()} ({platform.machine()})")
    print(f"  torch            {torch.__version__}")
    gpu = gpu_info()
    if gpu["cuda"]:
        print(f"  GPU              {gpu['name']}, capability {gpu['capability'][0]}.{gpu['capability'][1]} ({gpu['arch']}), CUDA {gpu['torch_cuda']}")
    else:
        print(f"  GPU              none: {gpu['reason']}")
    vllm_version = _version("vllm")
    supported = vllm_version_supported(vllm_version)
    ok &= supported
    print(f"  vLLM             {vllm_version} ({'supported' if supported else 'NOT supported; need ' + SUPPORTED_VLLM_TEXT})")
    print(f"  CuTe DSL         nvidia-cutlass-dsl {_version('nvidia-cutlass-dsl')}")
    print(f"  FlashInfer       {_version('flashinfer-python')}")
    print(f"  plugin           vllm-blackwell-sparse {_version('vllm-blackwell-sparse')}")
    ep = find_entry_point()
    if ep is None:
        ok = False
        print(f"  entry point      MISSING: no '{ENTRY_POINT_NAME}' in group '{ENTRY_POINT_GROUP}' (is the package installed?)")
    else:
        print(f"  entry point      {ENTRY_POINT_GROUP}: {ep.name} = {ep.value}")
        try:
            registered = ep.load()()
            from vllm.v1.attention.backends.registry import AttentionBackendEnum

            path = AttentionBackendEnum.CUSTOM.get_path() if registered else None
            ok &= path == BACKEND_CLASS_PATH
            print(f"  register()       {'CUSTOM -> ' + str(path) if registered else 'registered nothing (see the error above)'}")
        except Exception as e:  # noqa: BLE001
            ok = False
            print(f"  register()       FAILED: {type(e).__name__}: {e}")
        from vllm_blackwell_sparse import dsa

        problem = dsa.hook_problem()
        if problem:
            ok = False
            print(f"  DSA indexer hook FAILED: {problem}")
        elif dsa.is_installed():
            print("  DSA indexer hook armed (GVR replaces DeepSeek-V3.2's decode top-k when gvr_topk is true)")
        else:
            print("  DSA indexer hook not armed (register() did not complete)")
    try:
        from vllm_blackwell_sparse.config import load_config
        from vllm_blackwell_sparse.features import unavailable_feature_reasons

        cfg = load_config(None)
        print(f"  config (VBS_*)   {cfg.as_dict()}")
        for reason in unavailable_feature_reasons(cfg):
            ok = False
            print(f"  config (VBS_*)   REFUSED at start-up: {reason}")
    except Exception as e:  # noqa: BLE001
        ok = False
        print(f"  config (VBS_*)   INVALID: {e}")
    from vllm_blackwell_sparse.envs import did_you_mean, unknown_vbs_variables

    for name in unknown_vbs_variables():
        print(f"  environment      {name} is set but means nothing to vllm-blackwell-sparse{did_you_mean(name)}")
    print("  kernels")
    for name, state in kernel_availability(gpu).items():
        print(f"    {name:52s} {state}")
    print("  usage            vllm serve MODEL --attention-backend CUSTOM   |   LLM(MODEL, attention_backend='CUSTOM')")
    print("                   DeepSeek-V3.2 GVR top-k: vllm serve MODEL --additional-config '{\"blackwell_sparse\": {\"gvr_topk\": true}}'")
    return 0 if ok else 1
