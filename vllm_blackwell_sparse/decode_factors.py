"""vLLM glue: the decode threshold scale factor of every decode row, on the device.

With ``decode_threshold_scale_factor`` set, the BLASST decode kernel reads each request's
factor from one float32 buffer per device (``[max decode requests]``, made before vLLM
captures CUDA graphs). Captured graphs therefore replay with whatever the buffer holds:
changing a factor between steps compiles nothing and captures nothing.

Rows hold the engine's factor, or a request's own (``request_factors``, which rewrites
the rows whenever the batch changes). :func:`set_decode_threshold_scale_factor` changes
the engine's factor for the whole process at run time (``vbs calibrate`` and ``vbs eval``
sweep factors in one engine this way). ``inf`` means no skipping.
"""

from __future__ import annotations

import math
import threading

import torch

# Without a vLLM config (unit tests, direct use): rows of the buffer.
DEFAULT_MAX_DECODE_REQUESTS = 1024

# One buffer per (device, engine factor, rows): every layer of an engine and its batch-row
# logits processor compute the same key from the same settings, and a second engine in the
# same process with another factor gets its own buffer.
_BUFFERS: dict[tuple, torch.Tensor] = {}
_DEFAULTS: dict[tuple, float] = {}
_GENERATION = [0]  # bumped by every set_decode_threshold_scale_factor(): rows must be written again
_LOCK = threading.Lock()


def max_decode_requests(vllm_config=None) -> int:
    """The most decode requests one batch can hold: vLLM's max_num_seqs, or a CUDA-graph
    capture size above it (padded batches)."""
    if vllm_config is None:
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None:
        return DEFAULT_MAX_DECODE_REQUESTS
    return max(vllm_config.scheduler_config.max_num_seqs,
               vllm_config.compilation_config.max_cudagraph_capture_size or 0)


def factor_value(factor: float | None) -> float:
    """The buffer's encoding of a factor: the factor itself, ``inf`` for no skipping."""
    if factor is None or factor == math.inf:
        return math.inf
    if isinstance(factor, bool) or not (isinstance(factor, (int, float)) and factor > 0 and math.isfinite(factor)):
        raise ValueError(f"decode_threshold_scale_factor must be a finite number > 0 or None (no skipping), "
                         f"got {factor!r}")
    return float(factor)


def buffer_key(device, rows: int, factor: float | None) -> tuple:
    if isinstance(device, int):
        index = device
    else:
        device = torch.device(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
    return index, factor_value(factor), max(rows, 1)


def decode_factor_buffer(key: tuple) -> torch.Tensor:
    """The buffer of ``key`` (:func:`buffer_key`), made and filled with the engine's factor on
    first use: by the attention impls' constructors, before any CUDA-graph capture. Never
    replaced, so the impls, their captured graphs and the batch-row logits processor all
    hold the same memory."""
    with _LOCK:
        buf = _BUFFERS.get(key)
        if buf is None:
            index, value, rows = key
            _DEFAULTS[key] = value
            buf = torch.full((rows,), value, dtype=torch.float32, device=f"cuda:{index}")
            _BUFFERS[key] = buf
        return buf


def existing_decode_factor_buffer(key: tuple) -> torch.Tensor | None:
    """The buffer of ``key`` if the attention impls made it, else None (never makes one: a
    buffer no kernel reads would swallow per-request factors silently)."""
    with _LOCK:
        return _BUFFERS.get(key)


def current_default(key: tuple) -> tuple[float, int]:
    """The factor rows without their own hold now (``inf``: no skipping), and the number of
    run-time changes so far (a change to the same value also overwrote every row)."""
    return _DEFAULTS.get(key, key[1]), _GENERATION[0]


def set_decode_threshold_scale_factor(factor: float | None) -> int:
    """Set the engine's decode factor in this process (``None``: no skipping) for every row;
    returns how many device buffers were filled. Stream-ordered and synchronised, so the
    next step, graph replays included, sees it; the batch-row logits processor writes the
    rows of requests with their own factor again before that step's attention. Needs an
    engine started with a decode factor (the BLASST kernel is chosen at start-up; without
    it there is no buffer)."""
    value = factor_value(factor)
    with _LOCK:
        _GENERATION[0] += 1
        for key, buf in _BUFFERS.items():
            _DEFAULTS[key] = value
            buf.fill_(value)
            torch.cuda.synchronize(buf.device)
        return len(_BUFFERS)
