"""Decode top-k dispatcher: GVR where it measured faster than vLLM's own kernel, vLLM's elsewhere.

The crossover comes from ``vbs bench topk`` on the H200 (docs/BENCHMARKS.md, "a bit-mask
emit, a leaner verify count, part of the row in shared memory": DSA-like traces, k = 2048,
16-byte aligned rows; first set by the "one scan per lane" grid, unchanged since). GVR (its
default kernel choice, ``gvr_topk.default_kernel``) beats vLLM's choice (cooperative top-k
up to 32 rows, persistent above) everywhere measured except many short rows: 128 rows of
at most 32K columns (0.90-0.94x hot), where vLLM's persistent kernel keeps every SM busy
with less work per row. 64 rows of 16K-32K were level to ahead (1.01-1.12x) and go to GVR. Other GPUs, unaligned
rows and k outside GVR's sizes get vLLM's kernel. vLLM glue: it calls ``torch.ops._C``.
"""

from __future__ import annotations

import torch

# vLLM's kernel takes more than GVR_SHORT_MAX_ROWS rows of at most GVR_SHORT_MAX_COLS
# columns; GVR everything else (65-127 such rows were not measured: vLLM's side is the safe one).
GVR_SHORT_MAX_ROWS = 64
GVR_SHORT_MAX_COLS = 32 * 1024
MEASURED_CAPABILITIES = ((9, 0),)  # where the crossover above was measured
VLLM_TOPK_WORKSPACE_BYTES = 1024 * 1024  # vLLM 0.26's RADIX_TOPK_WORKSPACE_SIZE


def prefer_gvr(rows: int, cols: int, k: int, capability: tuple[int, int], aligned: bool = True) -> bool:
    """Whether GVR is the faster kernel for ``rows`` x ``cols`` logits (the measured crossover).
    ``cols`` is the logits' width; the benchmark's rows were that long. With rows much
    shorter than the width (vLLM's logits are ``max_model_len`` wide) the rule is untested."""
    from vllm_blackwell_sparse.kernels.gvr_topk import SUPPORTED_K

    if capability not in MEASURED_CAPABILITIES or k not in SUPPORTED_K or not aligned:
        return False
    many_short_rows = rows > GVR_SHORT_MAX_ROWS and cols <= GVR_SHORT_MAX_COLS
    return not many_short_rows


def decode_topk(
    logits: torch.Tensor,
    seq_lens: torch.Tensor,
    k: int,
    out: torch.Tensor,
    *,
    hint: torch.Tensor | None = None,
    hint_table: torch.Tensor | None = None,
    row_slot: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> str:
    """Decode top-k into ``out`` (int32 ``[rows, k]``) by the faster kernel, choosing
    among vLLM's as its 0.26 indexer does; returns ``"gvr"``, ``"vllm_cooperative"``,
    ``"vllm_persistent"`` or ``"vllm_per_row"``. The hint only serves GVR. vLLM's
    radix kernels need a 1 MiB uint8 ``workspace``; without one it is allocated (not
    capture-safe). GVR is exact (ties: lower index); vLLM's kernels break ties in arrival
    order and were not exact on every row of our traces (docs/BENCHMARKS.md)."""
    rows, cols = logits.shape
    capability = torch.cuda.get_device_capability(logits.device)
    from vllm_blackwell_sparse.kernels.gvr_topk import gvr_topk, rows_are_16b_aligned

    if prefer_gvr(rows, cols, k, capability, rows_are_16b_aligned(logits)):
        gvr_topk(logits, seq_lens, k, hint=hint, hint_table=hint_table, row_slot=row_slot, out=out)
        return "gvr"
    return vllm_decode_topk(logits, seq_lens, k, out, workspace=workspace)


def vllm_decode_topk(
    logits: torch.Tensor, seq_lens: torch.Tensor, k: int, out: torch.Tensor, *, workspace: torch.Tensor | None = None
) -> str:
    """vLLM's decode top-k kernel, chosen as vLLM 0.26's DSA indexer chooses it; returns its name.
    Rows that cannot be read in 16-byte chunks go to the per-row kernel: the cooperative and
    persistent kernels stopped with "misaligned address" on rows starting 4 bytes past a
    16-byte boundary (H200), which vLLM's own indexer, with its freshly allocated logits,
    never passes them."""
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

    from vllm_blackwell_sparse.kernels.gvr_topk import rows_are_16b_aligned

    rows, cols = logits.shape
    capability = torch.cuda.get_device_capability(logits.device)
    if capability >= (9, 0) and capability[0] != 12 and k in (512, 1024, 2048) and rows_are_16b_aligned(logits):
        if workspace is None:
            workspace = torch.zeros(VLLM_TOPK_WORKSPACE_BYTES, dtype=torch.uint8, device=logits.device)
        if rows <= 32:
            torch.ops._C.cooperative_topk(logits, seq_lens, out, workspace, k, cols)
            return "vllm_cooperative"
        torch.ops._C.persistent_topk(logits, seq_lens, out, workspace, k, cols)
        return "vllm_persistent"
    torch.ops._C.top_k_per_row_decode(logits, 1, seq_lens, out, rows, logits.stride(0), logits.stride(1), k)
    return "vllm_per_row"
