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

_BUFFERS: dict[int, torch.Tensor] = {}
_DEFAULTS: dict[int, float] = {}
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


def _index(device) -> int:
    if isinstance(device, int):
        return device
    device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def decode_factor_buffer(device, rows: int, factor: float | None) -> torch.Tensor:
    """The device's buffer, made on first use (``rows`` long, filled with ``factor``).

    Made before any CUDA-graph capture (the attention impls' and the batch-row logits
    processor's constructors) and never replaced, so every user holds the same memory."""
    index = _index(device)
    with _LOCK:
        buf = _BUFFERS.get(index)
        if buf is None:
            _DEFAULTS[index] = factor_value(factor)
            buf = torch.full((max(rows, 1),), _DEFAULTS[index], dtype=torch.float32, device=f"cuda:{index}")
            _BUFFERS[index] = buf
        elif buf.numel() < rows:
            raise RuntimeError(f"the decode factor buffer on cuda:{index} has {buf.numel()} rows, {rows} are needed")
        return buf


def current_default(device) -> float:
    """The engine's factor on ``device`` as the buffer encodes it (``inf``: no skipping)."""
    return _DEFAULTS.get(_index(device), math.inf)


def set_decode_threshold_scale_factor(factor: float | None) -> int:
    """Set the engine's decode factor in this process (``None``: no skipping) for every row;
    returns how many device buffers were filled. Stream-ordered and synchronised, so the
    next step, graph replays included, sees it. Per-request factors are written again at
    the next change of the batch. Needs an engine started with a decode factor (the BLASST
    kernel is chosen at start-up; without it there is no buffer)."""
    value = factor_value(factor)
    with _LOCK:
        for index, buf in _BUFFERS.items():
            _DEFAULTS[index] = value
            buf.fill_(value)
            torch.cuda.synchronize(buf.device)
        return len(_BUFFERS)
