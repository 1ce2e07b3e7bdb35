"""The plugin's configuration: ``additional_config["blackwell_sparse"]`` plus ``VBS_*`` overrides.

Users set it through vLLM's own channel, so it is part of vLLM's config hash and
reaches every vLLM process with the ``VllmConfig``::

    vllm serve M --additional-config '{"blackwell_sparse": {"decode_threshold_scale_factor": 20}}'
    LLM(M, additional_config={"blackwell_sparse": {"gvr_topk": True}})

An environment variable ``VBS_<KEY upper-case>`` overrides the key of the same name
(``VBS_DECODE_THRESHOLD_SCALE_FACTOR=20``). One rule reads JSON values and environment
text alike: a factor is a number or its text, ``null`` / ``"none"`` / empty unsets it; a
boolean is ``true`` / ``false``, ``1`` / ``0`` or the words yes / no / on / off (any
case, as JSON values or strings); an empty value means the default.
This module is readable from any process, with or without our attention backend
selected (the DeepSeek-V3.2 DSA path does not use it).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from vllm_blackwell_sparse.envs import ENV_PREFIX, EnvError, parse_bool

CONFIG_SECTION = "blackwell_sparse"

_FACTOR_HELP = "a finite number > 0, or null to disable skipping (λ = factor / kv_len)"
_BOOL_HELP = "true/false (also 1/0, yes/no, on/off)"
_KEY_HELP = {
    "prefill_threshold_scale_factor": _FACTOR_HELP,
    "decode_threshold_scale_factor": _FACTOR_HELP,
    "gvr_topk": _BOOL_HELP,
}


class ConfigError(ValueError):
    """A bad ``blackwell_sparse`` setting; the message names the key and what it accepts."""


@dataclass(frozen=True)
class BlackwellSparseConfig:
    """Validated settings. ``None`` for a threshold factor means dense (no skipping)."""

    prefill_threshold_scale_factor: float | None = None
    decode_threshold_scale_factor: float | None = None
    gvr_topk: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def blasst_requested(self) -> bool:
        return self.prefill_threshold_scale_factor is not None or self.decode_threshold_scale_factor is not None


def _parse_factor(key: str, value: Any, source: str) -> float | None:
    given = value
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none", "null"):
            return None
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{source}{key}={given!r} is not a number; expected {_FACTOR_HELP}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{source}{key}={given!r} has type {type(given).__name__}; expected {_FACTOR_HELP}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{source}{key}={given!r} is out of range; expected {_FACTOR_HELP}")
    return value


def _parse_bool(key: str, value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        if not value.strip():
            return False  # empty: the default
        try:
            return parse_bool(value, f"{source}{key}")
        except EnvError:
            pass
    raise ConfigError(f"{source}{key}={value!r} is not a boolean; expected {_BOOL_HELP}")


_PARSERS = {
    "prefill_threshold_scale_factor": _parse_factor,
    "decode_threshold_scale_factor": _parse_factor,
    "gvr_topk": _parse_bool,
}
CONFIG_KEYS = tuple(_PARSERS)


def env_var(key: str) -> str:
    """The environment variable that overrides ``key``: ``VBS_<KEY upper-case>``."""
    return ENV_PREFIX + key.upper()



def parse_config(section: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> BlackwellSparseConfig:
    """Validate a ``blackwell_sparse`` mapping and apply ``VBS_*`` overrides from ``environ``."""
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(
            f'additional_config["{CONFIG_SECTION}"] must be a JSON object, got {type(section).__name__}; '
            f"accepted keys: {sorted(_KEY_HELP)}"
        )
    unknown = sorted(set(section) - set(_PARSERS))
    if unknown:
        raise ConfigError(
            f'unknown key(s) {unknown} in additional_config["{CONFIG_SECTION}"]; accepted keys: '
            + ", ".join(f"{k} ({h})" for k, h in _KEY_HELP.items())
        )
    values = {k: _PARSERS[k](k, v, f'additional_config["{CONFIG_SECTION}"].') for k, v in section.items()}
    environ = os.environ if environ is None else environ
    for key, parse in _PARSERS.items():
        env_name = env_var(key)
        if env_name in environ:
            values[key] = parse(key, environ[env_name], f"environment variable {env_name}: ")
    return BlackwellSparseConfig(**values)


def section_from_additional_config(additional_config: Any) -> Mapping[str, Any] | None:
    """Our section of ``VllmConfig.additional_config`` (a dict, or a JSON string)."""
    if additional_config is None:
        return None
    if isinstance(additional_config, str):
        try:
            additional_config = json.loads(additional_config) if additional_config.strip() else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"additional_config is not valid JSON: {e}") from None
    if not isinstance(additional_config, Mapping):
        return None
    for problem in misplaced_settings(additional_config):
        from vllm_blackwell_sparse.util import get_logger, warn_once

        warn_once(get_logger(__name__), problem)
    return additional_config.get(CONFIG_SECTION)


def misplaced_settings(additional_config: Mapping[str, Any]) -> list[str]:
    """What in ``additional_config`` looks meant for us but sits where we never read it:
    a section whose name is close to ``blackwell_sparse``, or our keys at the top level."""
    import difflib

    problems = []
    for name in additional_config:
        if name == CONFIG_SECTION or not isinstance(name, str):
            continue
        if name in _PARSERS:
            problems.append(f'additional_config has "{name}" at the top level, where it is ignored; it belongs in '
                            f'additional_config["{CONFIG_SECTION}"]')
        elif difflib.get_close_matches(name.replace("-", "_").lower(), [CONFIG_SECTION], n=1, cutoff=0.8):
            problems.append(f'additional_config["{name}"] is ignored: did you mean "{CONFIG_SECTION}"?')
    return problems


def load_config(vllm_config: Any | None = None) -> BlackwellSparseConfig:
    """The plugin configuration of ``vllm_config`` (default: vLLM's current config).

    Works in any vLLM process; outside a vLLM config context it reads only ``VBS_*``.
    """
    if vllm_config is None:
        try:
            from vllm.config import get_current_vllm_config_or_none

            vllm_config = get_current_vllm_config_or_none()
        except ImportError:  # pragma: no cover - older vLLM without the helper
            vllm_config = None
    additional = getattr(vllm_config, "additional_config", None) if vllm_config is not None else None
    return parse_config(section_from_additional_config(additional))
