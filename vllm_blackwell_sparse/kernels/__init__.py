"""CuTe-DSL kernels: one package (or, for GVR top-k, one file) per kernel, each with its
compile cache. They know nothing of vLLM: plain torch tensors in and out."""

import os


def target_arch() -> str:
    """The arch kernels compile for: ``CUTE_DSL_ARCH`` when set (``sm_90a`` / ``sm_100a``,
    compile checks without a GPU), else the current GPU's. Part of every compile-cache key."""
    override = os.environ.get("CUTE_DSL_ARCH")
    if override:
        return override
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}a"
