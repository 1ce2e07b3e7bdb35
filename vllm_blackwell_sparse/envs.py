"""Every environment variable the project reads, in one registry.

``VBS_<KEY>`` overrides the configuration key of the same name (``config.py``); the
others are switches for diagnostics, tests and benchmarks. Code reads them through
:func:`env_bool` / :func:`env_text` / :func:`env_seconds`, which refuse a name that is
not registered here, so the README's table (checked against :data:`ENV_VARS` by a test)
lists everything there is. Values follow one rule: booleans ``1/true/yes/on`` or
``0/false/no/off`` (any case), an empty value means the default.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

ENV_PREFIX = "VBS_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


@dataclass(frozen=True)
class EnvVar:
    name: str
    kind: str  # "factor", "bool", "seconds", "path", "text"
    default: str
    meaning: str


ENV_VARS: dict[str, EnvVar] = {v.name: v for v in (
    EnvVar("VBS_PREFILL_THRESHOLD_SCALE_FACTOR", "factor", "unset",
           "overrides `prefill_threshold_scale_factor` (configuration reference)"),
    EnvVar("VBS_DECODE_THRESHOLD_SCALE_FACTOR", "factor", "unset",
           "overrides `decode_threshold_scale_factor`; not part of vLLM's compile hash, so changing it recompiles "
           "nothing"),
    EnvVar("VBS_GVR_TOPK", "bool", "false", "overrides `gvr_topk`"),
    EnvVar("VBS_BLASST_STATS", "bool", "false",
           "count skipped / eligible BLASST tiles per layer on the GPU (CUDA-graph safe, no host sync on the hot "
           "path) and log them through vLLM's logger every `VBS_BLASST_STATS_INTERVAL` seconds "
           "(`vllm_blackwell_sparse.blasst_stats.blasst_stats()` in the worker)"),
    EnvVar("VBS_BLASST_STATS_INTERVAL", "seconds", "10", "how often `VBS_BLASST_STATS` logs (0: never, only the "
           "accessor)"),
    EnvVar("VBS_GVR_STATS", "bool", "false",
           "GVR diagnostics per DSA indexer layer: hint hit rate, top-k overlap, ties at the cutoff (extra kernels, "
           "not for serving)"),
    EnvVar("VBS_CHECK_INPUTS", "bool", "false",
           "check what only the values of the kernels' inputs show (sequence lengths against the block table, "
           "block ids in range) before every eager BLASST decode launch: syncs the GPU, for debugging"),
    EnvVar("VBS_ENABLE_UNVERIFIED_SM100", "bool", "false",
           "run our BLASST decode and GVR kernels on sm_100 (Blackwell), where they are compile-checked only and "
           "have never run; without it Blackwell gets vLLM's own kernels"),
    EnvVar("VBS_TEST_ARTIFACTS", "path", "unset", "GPU tests write their JSON artifacts and logs here"),
    EnvVar("VBS_REAL_MODEL", "path", "unset",
           "GPU tests that need the real model take its checkpoint from here (else /tmp/smollm2 or the cache)"),
    EnvVar("VBS_COMMIT", "text", "unset",
           "the commit benchmark results are labelled with where the tree has no `.git` (the device host)"),
)}


class EnvError(ValueError):
    """A registered variable holds a value its kind does not accept; the message names it."""


def _registered(name: str) -> EnvVar:
    try:
        return ENV_VARS[name]
    except KeyError:
        raise KeyError(f"{name} is not registered in vllm_blackwell_sparse.envs.ENV_VARS") from None


def env_text(name: str, environ=None) -> str | None:
    """The raw value, or None when unset or empty."""
    _registered(name)
    value = (os.environ if environ is None else environ).get(name, "").strip()
    return value or None


def parse_bool(text: str, where: str) -> bool:
    """The project's one boolean rule (env and JSON strings alike)."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise EnvError(f"{where}={text!r} is not a boolean; expected one of {'/'.join(TRUE_WORDS)} or "
                   f"{'/'.join(FALSE_WORDS)}")


def env_bool(name: str, environ=None) -> bool:
    var = _registered(name)
    if var.kind != "bool":
        raise KeyError(f"{name} is a {var.kind}, not a bool")
    text = env_text(name, environ)
    return parse_bool(text, f"environment variable {name}") if text is not None else var.default == "true"


def env_seconds(name: str, environ=None) -> float:
    var = _registered(name)
    text = env_text(name, environ) or var.default
    try:
        value = float(text)
    except ValueError:
        raise EnvError(f"environment variable {name}={text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value >= 0):
        raise EnvError(f"environment variable {name}={text!r} must be a finite number of seconds >= 0")
    return value


def unknown_vbs_variables(environ=None) -> list[str]:
    """``VBS_*`` variables that are set but registered nowhere (likely typos)."""
    environ = os.environ if environ is None else environ
    return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in ENV_VARS)


def did_you_mean(name: str) -> str:
    """`` (did you mean VBS_X?)`` for the registered variable closest to ``name``, or ``""``."""
    import difflib

    match = difflib.get_close_matches(name, ENV_VARS, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""
