"""vLLM glue: what this release can do, checked against a configuration (the BLASST phases
that have a kernel, whether the DSA hook is installed). Kept apart from ``config`` so that
the configuration imports nothing of the features it configures."""

from __future__ import annotations

from vllm_blackwell_sparse.config import CONFIG_SECTION, BlackwellSparseConfig

# Which BLASST phases have a kernel in this release. A phase asked for without one is
# refused at startup: never a silently dense result.
BLASST_KERNEL_AVAILABLE = {"prefill": False, "decode": True}


def unavailable_feature_reasons(cfg: BlackwellSparseConfig) -> list[str]:
    """Reasons why ``cfg`` asks for something this release cannot do (empty if fine)."""
    reasons = []
    if cfg.gvr_topk:  # unsupported GPUs / k fall back with a warning; a failed hook is refused
        from vllm_blackwell_sparse.dsa import hook_problem

        problem = hook_problem()
        if problem:
            reasons.append(f"{CONFIG_SECTION}.gvr_topk is true but the DSA indexer hook is not installed: {problem}")
    for phase in ("prefill", "decode"):
        key = f"{phase}_threshold_scale_factor"
        if getattr(cfg, key) is not None and not BLASST_KERNEL_AVAILABLE[phase]:
            reasons.append(
                f"{CONFIG_SECTION}.{key} is set, but this release has no BLASST {phase} kernel yet; "
                f"unset it (dense attention) or upgrade vllm-blackwell-sparse"
            )
    return reasons
