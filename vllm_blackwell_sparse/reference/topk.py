"""Torch oracles for the DSA decode top-k: the exact answer and a phase-by-phase GVR emulation.

Semantics (shared by every top-k kernel of this project)
--------------------------------------------------------
Input: fp32 ``logits[rows, N]`` (any row stride) and ``seq_lens`` shaped like vLLM's,
``(B,)`` or ``(B, next_n)``, flattened to one length per row. Row ``i`` has
``L_i = clamp(seq_lens[i], 0, N)`` valid columns; columns ``>= L_i`` are garbage
(not -inf) and are never read.

Output: int32 ``[rows, k]``, an unordered *set* of column indices, like vLLM's
``cooperative_topk`` / ``persistent_topk``:

* ``L_i <= k``: all ``L_i`` valid columns, then ``-1`` padding.
* ``L_i > k``: exactly ``k`` distinct indices in ``[0, L_i)``.

Order of values: values are compared through a total order on fp32 keys,
``NaN > +inf > finite > -inf``, with ``-0.0 == +0.0`` and all NaNs equal
(``torch.topk`` also ranks NaN above everything).

Tie rule: among equal values at the cutoff, **lower column indices win**. The set is
therefore a deterministic function of the input. (vLLM's radix kernels break such ties
by arrival order, which is not deterministic; only the multiset of values is fixed
there.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_K = (512, 1024, 2048)
_BELOW_EVERY_KEY = -(2**40)  # sorts under every fp32 key (they fit in int32)


def ordered_keys(x: torch.Tensor) -> torch.Tensor:
    """Map fp32 values to int64 keys whose integer order is the value order above."""
    if x.dtype != torch.float32:
        raise TypeError(f"logits must be float32, got {x.dtype}")
    x = x + 0.0  # -0.0 -> +0.0
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    keys = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # flip magnitude order of negatives
    return torch.where(torch.isnan(x), torch.full_like(keys, 2**31 - 1), keys)


def row_lengths(seq_lens: torch.Tensor, rows: int, n_cols: int) -> torch.Tensor:
    """One valid length per logits row from vLLM-shaped ``seq_lens`` ((B,) or (B, next_n))."""
    if seq_lens.dim() not in (1, 2):
        raise ValueError(f"seq_lens must be (B,) or (B, next_n), got shape {tuple(seq_lens.shape)}")
    lens = seq_lens.reshape(-1).to(torch.int64)
    if lens.numel() != rows:
        raise ValueError(f"seq_lens has {lens.numel()} entries but logits has {rows} rows")
    return lens.clamp(0, n_cols)


def _check(logits: torch.Tensor, k: int) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, N], got shape {tuple(logits.shape)}")
    if logits.dtype != torch.float32:
        raise TypeError(f"logits must be float32, got {logits.dtype}")
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")


@torch.no_grad()
def topk_reference(logits: torch.Tensor, seq_lens: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k under the module's order and tie rule. Returns int32 ``[rows, k]``,
    each row listed by rank (value descending, index ascending), ``-1`` padded."""
    _check(logits, k)
    rows, n = logits.shape
    lens = row_lengths(seq_lens, rows, n).to(logits.device)
    col = torch.arange(n, device=logits.device)
    keys = ordered_keys(logits)
    keys = torch.where(col[None, :] < lens[:, None], keys, torch.full_like(keys, _BELOW_EVERY_KEY))
    # A stable descending sort keeps equal keys in column order: lower index first.
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]
    if order.shape[1] < k:
        order = torch.cat([order, order.new_full((rows, k - order.shape[1]), -1)], dim=1)
    rank = torch.arange(k, device=logits.device)
    return torch.where(rank[None, :] < lens[:, None], order, torch.full_like(order, -1)).to(torch.int32)


@dataclass
class GvrRowTrace:
    """What the GVR phases did on one row (for tests and tuning, not for results)."""

    length: int
    hint_valid: int = 0  # distinct hinted columns inside the row
    guess_source: str = "none"  # "hint", "sample", or "none" (row needs no selection)
    count_passes: int = 0  # full-row counting passes of phase 2
    candidates: int = 0  # survivors collected in phase 3
    overflow: bool = False  # candidates > cap: a kernel takes its slow path here


def _count_ge(keys: torch.Tensor, t: int) -> int:
    return int((keys >= t).sum())


@torch.no_grad()
def gvr_topk_emulation(
    logits: torch.Tensor,
    seq_lens: torch.Tensor,
    k: int,
    hint: torch.Tensor | None = None,
    *,
    cap_factor: float = 3.0,
    max_count_passes: int = 8,
    sample_size: int = 1024,
    return_trace: bool = False,
):
    """Guess-Verify-Refine top-k, written phase by phase as a kernel would run it.

    1. Guess: threshold T0 from the logits at the hinted columns (``hint[row]``, the
       previous step's top-k; entries ``< 0`` or ``>= L`` are ignored), or from a
       strided sample of the row when no hinted column is valid.
    2. Verify: count ``key >= T`` over the row; secant steps on T, kept inside a
       bracket and falling back to bisection, until ``k <= count <= cap``
       (``cap = cap_factor * k``) or the pass budget is spent.
    3. Collect the survivors in column order (what per-thread counts plus prefix
       sums give a kernel: deterministic offsets, no ballots, no atomics).
    4. Refine exactly: radix-select the k-th key among the survivors (4 passes of
       8 bits), keep every survivor above it and the lowest-index ones equal to it.

    The guess changes only how much work phases 2-4 do, never the result: the output
    equals ``topk_reference`` as a set for every input. Returns int32 ``[rows, k]``
    (survivors in column order, ``-1`` padded) and, with ``return_trace``, a list of
    ``GvrRowTrace``.
    """
    _check(logits, k)
    rows, n = logits.shape
    lens = row_lengths(seq_lens, rows, n)
    if hint is not None and (hint.dim() != 2 or hint.shape[0] != rows):
        raise ValueError(f"hint must be [rows={rows}, k'] int, got shape {tuple(hint.shape)}")
    cap = max(k, int(cap_factor * k))
    target = (k + cap) // 2
    out = torch.full((rows, k), -1, dtype=torch.int32, device=logits.device)
    traces = []
    for r in range(rows):
        length = int(lens[r])
        tr = GvrRowTrace(length=length)
        traces.append(tr)
        if length <= k:  # nothing to select: every valid column
            out[r, :length] = torch.arange(length, dtype=torch.int32, device=logits.device)
            tr.candidates = length
            continue
        keys = ordered_keys(logits[r, :length])

        # Phase 1: guess.
        t0 = None
        if hint is not None:
            h = hint[r].to(torch.int64)
            h = torch.unique(h[(h >= 0) & (h < length)])
            tr.hint_valid = int(h.numel())
            if h.numel():
                # All hinted columns are >= their minimum, so with k valid hints count(T0) >= k.
                t0 = int(keys[h.to(keys.device)].min())
                tr.guess_source = "hint"
        if t0 is None:
            stride = max(1, length // sample_size)
            sample = torch.sort(keys[::stride], descending=True).values
            rank = min(sample.numel() - 1, (target * sample.numel()) // length)
            t0 = int(sample[rank])
            tr.guess_source = "sample"

        # Phase 2: verify by counting; bracket lo (count >= k) / hi (count < k).
        lo, c_lo = int(keys.min()), length
        hi, c_hi = int(keys.max()) + 1, 0
        t, c = t0, _count_ge(keys, t0)
        tr.count_passes = 1
        while not (k <= c <= cap) and tr.count_passes < max_count_passes:
            if c < k:
                hi, c_hi = t, c
            else:
                lo, c_lo = t, c
            if hi - lo <= 1:
                break  # a block of equal keys at lo: cannot get under the cap by thresholding
            # Secant on (threshold, count) toward the target, kept strictly inside the bracket.
            f = (c_lo - target) / max(c_lo - c_hi, 1)
            f = min(max(f, 0.05), 0.95)
            t = lo + max(1, min(hi - lo - 1, int(f * (hi - lo))))
            c = _count_ge(keys, t)
            tr.count_passes += 1
        if c < k:  # pass budget spent below k: fall back to the bracket's lower end
            t, c = lo, c_lo
        tr.overflow = c > cap

        # Phase 3: collect survivors in column order.
        cand = torch.nonzero(keys >= t).flatten()
        ck = keys[cand]
        tr.candidates = int(cand.numel())

        # Phase 4: exact refine. Radix-select the k-th largest key (as uint32, MSB first).
        u = ck + 2**31
        prefix, need = 0, k
        for shift in (24, 16, 8, 0):
            sel = (u >> (shift + 8)) == (prefix >> (shift + 8)) if shift < 24 else torch.ones_like(u, dtype=torch.bool)
            digits = (u[sel] >> shift) & 0xFF
            hist = torch.bincount(digits, minlength=256)
            above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # count with digit >= d
            d = int(torch.nonzero(above >= need).max())
            need -= int(above[d] - hist[d])  # taken by digits above d
            prefix |= d << shift
        kth = prefix - 2**31
        gt = cand[ck > kth]
        eq = cand[ck == kth][: k - gt.numel()]
        out[r] = torch.sort(torch.cat([gt, eq])).values.to(torch.int32)
    return (out, traces) if return_trace else out


def topk_overlap_counts(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """|previous ∩ current| per row of two ``[rows, k]`` index sets (``-1`` = empty), in
    plain torch ops (capture-safe; the DSA hook's statistics use it inside CUDA graphs).
    Each row of a top-k set is duplicate-free, so duplicates in the concatenation are
    exactly the common indices."""
    both = torch.cat([previous, current], dim=1).to(torch.int64)
    filler = -2 - torch.arange(both.shape[1], device=both.device)  # distinct, never a column
    both = torch.where(both < 0, filler, both)
    ordered = both.sort(dim=1).values
    return (ordered[:, 1:] == ordered[:, :-1]).sum(dim=1)
