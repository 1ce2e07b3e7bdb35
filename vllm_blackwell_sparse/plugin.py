"""vLLM general plugin: ``register()`` puts our backend in the ``CUSTOM`` slot and arms
the DSA indexer hook (GVR top-k, ``dsa.py``; it acts only when ``gvr_topk`` is on).

vLLM calls ``register()`` in every process it starts (API server, engine core,
workers) through the ``vllm.general_plugins`` entry point ``blackwell_sparse``
(``VLLM_PLUGINS`` filters by that name). It must therefore be idempotent, cheap, never
initialise CUDA and never raise: outside the tested vLLM range it logs one clear
error and registers nothing, so vLLM still starts for users who do not select it.
"""

from __future__ import annotations

from vllm_blackwell_sparse.util import get_logger

BACKEND_CLASS_PATH = "vllm_blackwell_sparse.backend.BlackwellSparseBackend"
SUPPORTED_VLLM = (">=0.26.0", "<0.27")  # the tested range; the README's support matrix
SUPPORTED_VLLM_TEXT = "vllm>=0.26.0,<0.27"

# Under vLLM's "vllm" logger: these lines print in vLLM's format, in every vLLM process.
logger = get_logger(__name__)
_state = {"done": False, "registered": False}


def vllm_version_supported(version: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(version)
    except InvalidVersion:
        return False
    # Dev and local builds of a supported release count as that release.
    return Version(v.base_version) in SpecifierSet(",".join(SUPPORTED_VLLM))


def register() -> bool:
    """Register the ``CUSTOM`` attention backend. Returns whether it is registered."""
    if _state["done"]:
        return _state["registered"]
    _state["done"] = True
    try:
        import vllm

        version = getattr(vllm, "__version__", "unknown")
        if not vllm_version_supported(version):
            logger.error(
                "vllm-blackwell-sparse supports %s but vLLM %s is installed; the CUSTOM attention "
                "backend is NOT registered. Install a supported vLLM or uninstall vllm-blackwell-sparse.",
                SUPPORTED_VLLM_TEXT,
                version,
            )
            return False
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        register_backend(AttentionBackendEnum.CUSTOM, BACKEND_CLASS_PATH)
        _state["registered"] = True
    except Exception:  # never break vLLM's start-up for users who do not select us
        logger.exception("vllm-blackwell-sparse: registering the CUSTOM attention backend failed; vLLM starts "
                         "without it (selecting --attention-backend CUSTOM will fail)")
        return False
    try:
        from vllm_blackwell_sparse import dsa

        dsa.install()  # post-import hooks only: the indexer module is not imported here
    except Exception:
        logger.exception("vllm-blackwell-sparse: arming the DSA indexer hook failed; gvr_topk is unavailable "
                         "(the CUSTOM backend is registered)")
    _report_environment_config()
    return _state["registered"]


def _report_environment_config() -> None:
    """Log (never raise) what is wrong with the ``VBS_*`` settings. ``additional_config``
    is not visible here (no VllmConfig exists yet); it is validated when the backend is
    selected, where a problem refuses start-up with vLLM's reason line."""
    from vllm_blackwell_sparse.config import ConfigError, parse_config
    from vllm_blackwell_sparse.features import unavailable_feature_reasons

    from vllm_blackwell_sparse.envs import did_you_mean, unknown_vbs_variables

    try:
        problems = unavailable_feature_reasons(parse_config({}))
    except ConfigError as e:
        problems = [str(e)]
    for problem in problems:
        logger.error("vllm-blackwell-sparse: %s. The CUSTOM backend stays registered; selecting it refuses start-up "
                     "with this reason, other backends start normally.", problem)
    for name in unknown_vbs_variables():
        logger.warning("vllm-blackwell-sparse: %s is set but is not one of our variables, so it does nothing%s",
                       name, did_you_mean(name))
