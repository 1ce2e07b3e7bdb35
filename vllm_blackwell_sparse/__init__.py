"""vllm-blackwell-sparse: a vLLM plugin for long-context attention on FlashAttention
(FA3 on Hopper, FA4 on Blackwell), with BLASST tile skipping and GVR top-k (see README.md).

Importing the package is cheap and imports neither vLLM nor CUDA code.
"""

__version__ = "0.9.0"


def register() -> bool:
    """vLLM plugin entry point; see ``vllm_blackwell_sparse.plugin.register``."""
    from vllm_blackwell_sparse.plugin import register as _register

    return _register()
