"""vLLM glue: a decode threshold scale factor per request.

A request sets ``SamplingParams.extra_args["vbs_decode_threshold_scale_factor"]`` (the
OpenAI server fills ``extra_args`` from the request's ``vllm_xargs``): a number > 0, or
``"off"`` for no skipping. It overrides the engine's ``decode_threshold_scale_factor`` for
that request. Enable it by naming the logits processor below, which keeps vLLM's
persistent-batch rows in step with the per-row factor buffer the BLASST decode kernel
reads (``decode_factors``)::

    vllm serve M --attention-backend CUSTOM --logits-processors vllm_blackwell_sparse.request_factors:DecodeFactorRows \\
        --additional-config '{"blackwell_sparse": {"decode_threshold_scale_factor": 64}}'
    LLM(M, attention_backend="CUSTOM", logits_processors=[DecodeFactorRows], additional_config=...)

Why a logits processor: it is vLLM's one interface that is told, before every step's
attention metadata is built, which request sits in which batch row (added, removed,
moved), and that validates a request's arguments when it arrives (a bad value is
refused with an error naming the key). It leaves the logits alone. vLLM runs its V1
model runner when a logits processor is configured.

With the engine factor set, every decode row runs the BLASST kernel and the factor is
read from the device at run time: one captured CUDA graph serves every mix of factors and
a new factor compiles nothing. With the engine factor unset the engine runs dense FA3 (the
kernel is chosen at start-up): a request asking for a factor is served dense and a
warning says so once.
"""

from __future__ import annotations

import math

import torch

from vllm_blackwell_sparse.decode_factors import (
    buffer_key, current_default, existing_decode_factor_buffer, max_decode_requests,
)
from vllm_blackwell_sparse.util import get_logger, warn_once

logger = get_logger(__name__)

REQUEST_FACTOR_KEY = "vbs_decode_threshold_scale_factor"
_ACCEPTED = 'a number > 0, or "off" for no skipping'

try:
    from vllm.v1.sample.logits_processor import LogitsProcessor
except ImportError:  # pragma: no cover - vLLM is a dependency; keeps the parser importable alone
    LogitsProcessor = object


def parse_request_factor(value) -> float:
    """A request's factor as the kernel's buffer holds it (``inf``: no skipping)."""
    given = value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "off":
            return math.inf
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{REQUEST_FACTOR_KEY}={given!r} is not a number; expected {_ACCEPTED}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{REQUEST_FACTOR_KEY}={given!r} has type {type(given).__name__}; expected {_ACCEPTED}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{REQUEST_FACTOR_KEY}={given!r} is out of range; expected {_ACCEPTED}")
    return float(value)


def request_factor(params) -> float | None:
    """The factor a request asked for, or None (the engine's)."""
    extra = getattr(params, "extra_args", None) or {}
    if REQUEST_FACTOR_KEY not in extra:
        return None
    return parse_request_factor(extra[REQUEST_FACTOR_KEY])


class RowFactors:
    """The per-row factors of vLLM's persistent batch, from its batch updates (plain
    Python; :class:`DecodeFactorRows` writes them to the device)."""

    def __init__(self, rows: int):
        self.asked: list[float | None] = [None] * rows

    def apply(self, batch_update) -> bool:
        """Removed, then added, then moved (vLLM's order); True when a row changed."""
        if batch_update is None:
            return False
        for i in batch_update.removed:
            self.asked[i] = None
        for added in batch_update.added:
            index, params = added[0], added[1]
            self.asked[index] = request_factor(params)
        for a, b, direction in batch_update.moved:
            if getattr(direction, "name", str(direction)) == "SWAP":
                self.asked[a], self.asked[b] = self.asked[b], self.asked[a]
            else:
                self.asked[b], self.asked[a] = self.asked[a], None
        return bool(batch_update.removed or batch_update.added or batch_update.moved)

    def values(self, batch_size: int, default: float) -> list[float]:
        return [default if f is None else f for f in self.asked[:batch_size]]


class DecodeFactorRows(LogitsProcessor):
    """Keeps the BLASST decode kernel's per-row factors in step with the batch; the logits
    are left as they are (see the module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        request_factor(sampling_params)  # raises ValueError naming the key

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        from vllm_blackwell_sparse.config import load_config

        self.engine_factor = load_config(vllm_config).decode_threshold_scale_factor
        backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
        self.ignored = None
        if self.engine_factor is None:
            self.ignored = ("this engine runs dense decode (decode_threshold_scale_factor is unset, so the BLASST "
                            "kernel is not in use): served dense. Start the engine with a decode factor to allow "
                            "per-request factors")
        elif backend is not None and getattr(backend, "name", str(backend)) != "CUSTOM":
            self.ignored = f"the attention backend is {getattr(backend, 'name', backend)}, not CUSTOM: ignored"
        parallel = getattr(vllm_config, "parallel_config", None)
        if not self.ignored and parallel is not None and getattr(parallel, "use_ubatching", False):
            # Each micro-batch's attention reads the factor rows from 0: they would be misaligned.
            raise ValueError("vllm_blackwell_sparse.request_factors.DecodeFactorRows does not support micro-batching "
                             "(--enable-dbo / ubatch_size > 1): drop the logits processor (the engine's factor still "
                             "applies) or the micro-batching")
        rows = max_decode_requests(vllm_config)
        self.rows = RowFactors(rows)
        self.key = buffer_key(device, rows, self.engine_factor) if device.type == "cuda" and not self.ignored else None
        self.buffer = None
        self.written_generation = None
        self.batch_size = 0
        self.pin = is_pin_memory

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update) -> None:
        changed = self.rows.apply(batch_update)
        if batch_update is not None:
            self.batch_size = batch_update.batch_size
        if self.ignored:
            if changed and any(f is not None for f in self.rows.asked):
                warn_once(logger, f"a request set {REQUEST_FACTOR_KEY}, but {self.ignored}")
            return
        if self.key is None:
            return
        default, generation = current_default(self.key)
        if not changed and generation == self.written_generation:
            return
        if self.buffer is None:
            self.buffer = existing_decode_factor_buffer(self.key)  # made by the attention impls at start-up
            if self.buffer is None:
                self.ignored = ("no attention layer of this engine reads a decode factor buffer of its settings "
                                f"(device, factor, rows = {self.key}): ignored")
                warn_once(logger, f"{REQUEST_FACTOR_KEY}: {self.ignored}")
                return
        values = self.rows.values(self.batch_size, default)
        self.written_generation = generation
        if values:
            # Ordered on the current stream, before this step's attention (graph replays
            # included). The pinned source block is reused by torch's host allocator only
            # after this copy has completed, so the host never waits for the GPU here.
            src = torch.tensor(values, dtype=torch.float32)
            self.buffer[:len(values)].copy_(src.pin_memory() if self.pin else src, non_blocking=self.pin)
