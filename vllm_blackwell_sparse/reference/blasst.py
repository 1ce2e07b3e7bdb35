"""Torch oracle for BLASST attention over a paged KV cache.

This file *defines* the semantics every BLASST kernel is tested against. It is plain
PyTorch (CPU or GPU), knows nothing of vLLM, and favours clarity over speed.

The rule (the project's shared convention)
------------------------------------------
Scores are ``q·k × softmax_scale``. Keys are processed in *tiles* of ``kv_tile_size``
keys (the kernel's tile, not a cache page). Query rows are *packed* the way a GQA
decode kernel packs them: for one request and one KV head, the G = Hq/Hkv query heads
that share the KV head and the request's query tokens form the rows
``r = t * G + g`` (token-major). Those rows are cut into groups of ``q_tile_rows``;
one group votes together on every KV tile.

For a tile visited after another tile of the same (request, KV head, row group,
split), with ``m_run`` the true running row max so far and ``m_loc`` the tile's row
max, the tile is skipped iff ``m_loc - m_run < ln λ`` for every live row, where
``λ = threshold_scale_factor / kv_len`` of that request. Padding rows (past the
request's packed rows) do not vote. A row with no unmasked key in the tile
(``m_loc = -inf``) votes "skip" (it would contribute nothing); a row that has seen no
key yet (``m_run = -inf``) but has one in this tile votes "keep". There is no skipping
when the factor is unset or ``λ >= 1``, and the first tile of each split is never
skipped. A skipped tile contributes nothing: no exponentials, no V, no P·V, and the
running max and sum are left as they are.

The decision of a tile is ``max_r (m_loc_r - m_run_r) < ln λ`` and its *margin* is
``|max_r (m_loc_r - m_run_r) - ln λ|``: how far the deciding quantity is from the
threshold. Kernels compute in a different order and precision, so they must agree
with this oracle on every decision whose margin exceeds 1e-3; the others are counted.

Split-KV: the visited tiles ``[0, n_tiles)`` are cut into contiguous ranges. With a
``split_rule = (min_tiles, target_splits)`` the ranges depend on the request's own
length only (:func:`rule_tile_ranges`): ``max(min_tiles, ceil(T / target_splits))``
tiles each, ``T = ceil(kv_len / kv_tile_size)``, from tile 0 (the batch-invariant rule
kernels run by default). Otherwise ``num_splits`` ranges (:func:`split_tile_ranges`): by
default of ``ceil(n_tiles / num_splits)`` tiles each; with ``long_splits = L > 0`` the
first ``L`` ranges are ``long_split_ratio`` times as long as the rest.
Each split has its own running statistics and its first visited tile is never skipped.
Splits are merged with their log-sum-exp. ``visit_order`` is the order the kernel walks
the tiles of a split.
With causal masking, tiles entirely past the causal limit of the row group are not
visited at all (a kernel does not load them) and so are neither eligible nor skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

VISIT_ORDERS = ("ascending", "descending")
AMBIGUOUS_MARGIN = 1e-3


@dataclass
class BlasstDecisions:
    """One row per eligible tile (every visited tile but the first of its split)."""

    request: torch.Tensor  # int64 [E]
    kv_head: torch.Tensor  # int64 [E]
    q_tile: torch.Tensor  # int64 [E]: index of the voting row group within the request
    split: torch.Tensor  # int64 [E]
    kv_tile: torch.Tensor  # int64 [E]: tile index within the request's keys
    skipped: torch.Tensor  # bool [E]
    margin: torch.Tensor  # float32 [E]; NaN when skipping is off for the request

    def __len__(self) -> int:
        return int(self.skipped.numel())


@dataclass
class BlasstResult:
    out: torch.Tensor  # [total_q, Hq, Dv], float32
    lse: torch.Tensor  # [total_q, Hq], natural log; -inf for a row that saw no key
    decisions: BlasstDecisions
    skipped_tiles: int = 0
    eligible_tiles: int = 0
    per_request_lambda: list[float | None] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Skipped / eligible tiles (0.0 when nothing was eligible)."""
        return self.skipped_tiles / self.eligible_tiles if self.eligible_tiles else 0.0

    def num_ambiguous(self, tol: float = AMBIGUOUS_MARGIN) -> int:
        """Decisions too close to the threshold to demand agreement with a kernel."""
        m = self.decisions.margin
        return int(((m <= tol) & ~torch.isnan(m)).sum())


def blasst_log_lambda(threshold_scale_factor: float | None, kv_len: int) -> float | None:
    """``ln λ`` for a request, or None when skipping is off for it (unset or λ >= 1)."""
    if threshold_scale_factor is None or kv_len <= 0:
        return None
    if not (threshold_scale_factor > 0 and math.isfinite(threshold_scale_factor)):
        raise ValueError(
            f"threshold_scale_factor must be a finite number > 0 or None, got {threshold_scale_factor!r}"
        )
    log_lam = math.log(threshold_scale_factor) - math.log(kv_len)
    return log_lam if log_lam < 0.0 else None


def request_factors(threshold_scale_factor, batch: int) -> list[float | None]:
    """One factor (or None: no skipping) per request from a scalar, a sequence or a tensor
    (``inf`` in a sequence means no skipping, as in the kernel's per-request tensor)."""
    if threshold_scale_factor is None or isinstance(threshold_scale_factor, (int, float)):
        return [threshold_scale_factor] * batch
    values = (threshold_scale_factor.tolist() if isinstance(threshold_scale_factor, torch.Tensor)
              else list(threshold_scale_factor))
    if len(values) != batch:
        raise ValueError(f"threshold_scale_factor has {len(values)} values for {batch} requests")
    return [None if v is None or v == math.inf else float(v) for v in values]


def gather_paged_kv(cache: torch.Tensor, block_table_row: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Keys (or values) of one request, ``[kv_len, Hkv, D]``, from a paged cache
    ``[num_blocks, block_size, Hkv, D]`` and the request's block-table row."""
    block_size = cache.shape[1]
    pos = torch.arange(kv_len, device=cache.device)
    blocks = block_table_row.to(cache.device).long()[pos // block_size]
    return cache[blocks, pos % block_size]


def split_unit(n_tiles: int, num_splits: int, long_splits: int = 0, long_split_ratio: int = 1) -> int:
    """Tiles of a short split of :func:`split_tile_ranges` (a long one has ``long_split_ratio``
    times as many), before clipping to ``n_tiles``."""
    return -(-n_tiles // (long_split_ratio * long_splits + num_splits - long_splits))


def split_tile_ranges(n_tiles: int, num_splits: int, long_splits: int = 0, long_split_ratio: int = 1) -> list[tuple[int, int]]:
    """The tile range ``[t0, t1)`` of every split (empty ranges included, ``t0 == t1``).

    ``unit = ceil(n_tiles / (long_split_ratio * long_splits + num_splits - long_splits))``;
    split ``s < long_splits`` covers ``long_split_ratio * unit`` tiles, every later one
    ``unit``, in order from tile 0, clipped to ``n_tiles``. ``long_splits = 0`` (or ratio
    1) is the uniform cut into ``ceil(n_tiles / num_splits)``-tile ranges.
    """
    _check_split_shape(num_splits, long_splits, long_split_ratio)
    unit = split_unit(n_tiles, num_splits, long_splits, long_split_ratio)
    ranges = []
    for s in range(num_splits):
        if s < long_splits:
            t0, size = s * long_split_ratio * unit, long_split_ratio * unit
        else:
            t0, size = long_splits * long_split_ratio * unit + (s - long_splits) * unit, unit
        ranges.append((min(t0, n_tiles), min(t0 + size, n_tiles)))
    return ranges


def rule_tile_ranges(kv_len: int, n_tiles: int, kv_tile_size: int, min_tiles: int, target_splits: int) -> list[tuple[int, int]]:
    """The tile ranges of a row group visiting tiles ``[0, n_tiles)`` of a request of
    ``kv_len`` keys under the request-only split rule: every request of ``T =
    ceil(kv_len / kv_tile_size)`` tiles has ``max(1, ceil(T / L))`` ranges of
    ``L = max(min_tiles, ceil(T / target_splits))`` tiles, clipped to ``n_tiles`` (a row
    group whose causal limit ends early gets empty ranges at its end)."""
    if min_tiles < 1 or target_splits < 1:
        raise ValueError(f"split_rule needs min_tiles >= 1 and target_splits >= 1, got ({min_tiles}, {target_splits})")
    total = -(-max(kv_len, 0) // kv_tile_size)
    length = max(min_tiles, -(-total // target_splits))
    count = max(1, -(-total // length))
    return [(min(s * length, n_tiles), min((s + 1) * length, n_tiles)) for s in range(count)]


def _check_split_shape(num_splits, long_splits, long_split_ratio):
    if num_splits < 1 or num_splits != int(num_splits):
        raise ValueError(f"num_splits must be an integer >= 1, got {num_splits}")
    if not 0 <= long_splits <= num_splits or long_splits != int(long_splits):
        raise ValueError(f"long_splits must be an integer in [0, num_splits={num_splits}], got {long_splits}")
    if long_split_ratio < 1 or long_split_ratio != int(long_split_ratio):
        raise ValueError(f"long_split_ratio must be an integer >= 1, got {long_split_ratio}")


def _check_inputs(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, kv_tile_size, q_tile_rows, visit_order):
    if q.dim() != 3:
        raise ValueError(f"q must be [total_q, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("k_cache and v_cache must be [num_blocks, block_size, num_kv_heads, head_dim]")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} disagree")
    hq, hkv = q.shape[1], k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"num_q_heads ({hq}) must be a multiple of num_kv_heads ({hkv})")
    if q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q head_dim {q.shape[2]} != k_cache head_dim {k_cache.shape[3]}")
    if cu_seqlens_q.dim() != 1 or seq_lens.dim() != 1 or cu_seqlens_q.numel() != seq_lens.numel() + 1:
        raise ValueError("cu_seqlens_q must be [B+1] and seq_lens [B]")
    if block_table.dim() != 2 or block_table.shape[0] != seq_lens.numel():
        raise ValueError("block_table must be [B, max_blocks_per_request]")
    if kv_tile_size <= 0:
        raise ValueError(f"kv_tile_size must be > 0, got {kv_tile_size}")
    if q_tile_rows is not None and q_tile_rows <= 0:
        raise ValueError(f"q_tile_rows must be > 0 or None, got {q_tile_rows}")
    if visit_order not in VISIT_ORDERS:
        raise ValueError(f"visit_order must be one of {VISIT_ORDERS}, got {visit_order!r}")


@torch.no_grad()
def blasst_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    causal: bool = True,
    threshold_scale_factor: float | Sequence[float | None] | torch.Tensor | None = None,
    kv_tile_size: int = 128,
    q_tile_rows: int | None = None,
    num_splits: int = 1,
    visit_order: str = "descending",
    long_splits: int = 0,
    long_split_ratio: int = 1,
    split_rule: tuple[int, int] | None = None,
) -> BlasstResult:
    """Tile-wise online-softmax attention with the BLASST skip rule (module docstring).

    Args:
        q: ``[total_q, Hq, D]`` queries of all requests, concatenated (varlen).
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D|Dv]`` paged caches.
        block_table: ``[B, max_blocks]`` block ids of each request.
        cu_seqlens_q: ``[B+1]`` query offsets. seq_lens: ``[B]`` KV lengths, the
            request's new tokens included (its queries are its last tokens).
        softmax_scale: defaults to ``1/sqrt(D)``.
        threshold_scale_factor: λ = factor / kv_len; None = dense. A sequence (or tensor)
            gives each request its own factor; ``None`` or ``inf`` there: no skipping.
        kv_tile_size: keys per tile. q_tile_rows: packed rows voting together
            (None: all packed rows of a request and KV head form one group).
        num_splits: split-KV ranges per row group. visit_order: order of tiles
            within a split, ``"descending"`` (FA4's) or ``"ascending"``.
        long_splits, long_split_ratio: the first ``long_splits`` splits are
            ``long_split_ratio`` times as long as the rest (:func:`split_tile_ranges`).
        split_rule: ``(min_tiles, target_splits)``: the request-only ranges of
            :func:`rule_tile_ranges` instead of ``num_splits`` and the rest.
    """
    _check_inputs(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, kv_tile_size, q_tile_rows, visit_order)
    _check_split_shape(num_splits, long_splits, long_split_ratio)
    total_q, hq, d = q.shape
    hkv, dv = k_cache.shape[2], v_cache.shape[3]
    g = hq // hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    dev = q.device
    out = torch.zeros(total_q, hq, dv, dtype=torch.float32, device=dev)
    lse_out = torch.full((total_q, hq), float("-inf"), dtype=torch.float32, device=dev)
    cols: dict[str, list] = {k: [] for k in ("request", "kv_head", "q_tile", "split", "kv_tile", "skipped", "margin")}
    lambdas: list[float | None] = []
    cu = [int(x) for x in cu_seqlens_q.tolist()]
    lens = [int(x) for x in seq_lens.tolist()]
    factors = request_factors(threshold_scale_factor, len(lens))

    for b, kv_len in enumerate(lens):
        q0, q_len = cu[b], cu[b + 1] - cu[b]
        log_lam = blasst_log_lambda(factors[b], kv_len)
        lambdas.append(None if log_lam is None else math.exp(log_lam))
        if q_len == 0:
            continue
        if q_len > kv_len:
            raise ValueError(f"request {b}: {q_len} query tokens but seq_lens={kv_len} (queries are the last tokens)")
        keys = gather_paged_kv(k_cache, block_table[b], kv_len).float()  # [L, Hkv, D]
        vals = gather_paged_kv(v_cache, block_table[b], kv_len).float()  # [L, Hkv, Dv]
        n_rows = q_len * g
        rows_per_tile = q_tile_rows or n_rows
        # Packed rows r = t*G + g -> (token t, q head h_kv*G + g), for every KV head at once.
        qb = q[q0:q0 + q_len].float().view(q_len, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, n_rows, d)
        row_token = torch.arange(n_rows, device=dev) // g
        for qt, r0 in enumerate(range(0, n_rows, rows_per_tile)):
            r1 = min(r0 + rows_per_tile, n_rows)
            q_rows = qb[:, r0:r1]  # [Hkv, R, D]
            # Last key each row may see (exclusive).
            limit = (kv_len - q_len + row_token[r0:r1] + 1) if causal else torch.full((r1 - r0,), kv_len, device=dev)
            kv_end = int(limit.max())
            n_tiles = -(-kv_end // kv_tile_size)
            o_parts, lse_parts = [], []
            if split_rule is not None:
                ranges = rule_tile_ranges(kv_len, n_tiles, kv_tile_size, *split_rule)
            else:
                ranges = split_tile_ranges(n_tiles, num_splits, long_splits, long_split_ratio)
            for s, (t0, t1) in enumerate(ranges):
                if t0 >= t1:
                    continue
                order = range(t0, t1) if visit_order == "ascending" else range(t1 - 1, t0 - 1, -1)
                m_run = torch.full((hkv, r1 - r0), float("-inf"), device=dev)
                l_run = torch.zeros(hkv, r1 - r0, device=dev)
                acc = torch.zeros(hkv, r1 - r0, dv, device=dev)
                for i, n in enumerate(order):
                    k0, k1 = n * kv_tile_size, min((n + 1) * kv_tile_size, kv_len)
                    s_tile = torch.einsum("hrd,khd->hrk", q_rows, keys[k0:k1]) * scale
                    key_pos = torch.arange(k0, k1, device=dev)
                    s_tile = s_tile.masked_fill(key_pos[None, None, :] >= limit[None, :, None], float("-inf"))
                    m_loc = s_tile.amax(dim=-1)  # [Hkv, R]
                    keep = torch.ones(hkv, dtype=torch.bool, device=dev)
                    if i > 0:  # eligible tile
                        margin = torch.full((hkv,), float("nan"), device=dev)
                        if log_lam is not None:
                            diff = m_loc - m_run
                            diff = torch.where(m_loc == float("-inf"), torch.full_like(diff, float("-inf")), diff)
                            diff = torch.where((m_run == float("-inf")) & (m_loc > float("-inf")), torch.full_like(diff, float("inf")), diff)
                            worst = diff.amax(dim=1)  # the row most against skipping decides
                            keep = ~(worst < log_lam)
                            margin = (worst - log_lam).abs()
                        for name, val in (("request", b), ("q_tile", qt), ("split", s), ("kv_tile", n)):
                            cols[name].append(torch.full((hkv,), val, dtype=torch.int64, device=dev))
                        cols["kv_head"].append(torch.arange(hkv, device=dev))
                        cols["skipped"].append(~keep)
                        cols["margin"].append(margin)
                    # Online softmax update for the heads that keep the tile.
                    m_new = torch.maximum(m_run, m_loc)
                    base = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
                    p = torch.exp(s_tile - base[..., None])
                    alpha = torch.exp(m_run - base)
                    upd_l = l_run * alpha + p.sum(-1)
                    upd_acc = acc * alpha[..., None] + torch.einsum("hrk,khd->hrd", p, vals[k0:k1])
                    kh = keep[:, None]
                    m_run = torch.where(kh, m_new, m_run)
                    l_run = torch.where(kh, upd_l, l_run)
                    acc = torch.where(kh[..., None], upd_acc, acc)
                lse_s = torch.where(l_run > 0, m_run + torch.log(l_run.clamp_min(1e-38)), torch.full_like(l_run, float("-inf")))
                o_parts.append(torch.where(l_run[..., None] > 0, acc / l_run.clamp_min(1e-38)[..., None], torch.zeros_like(acc)))
                lse_parts.append(lse_s)
            lse_all = torch.stack(lse_parts)  # [S, Hkv, R]
            lse = torch.logsumexp(lse_all, dim=0)
            w = torch.where(torch.isfinite(lse)[None], torch.exp(lse_all - lse[None]), torch.zeros_like(lse_all))
            o = (w[..., None] * torch.stack(o_parts)).sum(0)  # [Hkv, R, Dv]
            # Scatter back: packed row r -> token q0 + r // G, head h*G + r % G.
            rr = torch.arange(r0, r1, device=dev)
            tok, gg = q0 + rr // g, rr % g
            for h in range(hkv):
                out[tok, h * g + gg] = o[h]
                lse_out[tok, h * g + gg] = lse[h]

    def cat(name, dtype):
        return torch.cat(cols[name]) if cols[name] else torch.zeros(0, dtype=dtype, device=dev)

    decisions = BlasstDecisions(
        request=cat("request", torch.int64), kv_head=cat("kv_head", torch.int64), q_tile=cat("q_tile", torch.int64),
        split=cat("split", torch.int64), kv_tile=cat("kv_tile", torch.int64), skipped=cat("skipped", torch.bool),
        margin=cat("margin", torch.float32),
    )
    return BlasstResult(
        out=out, lse=lse_out, decisions=decisions, skipped_tiles=int(decisions.skipped.sum()),
        eligible_tiles=len(decisions), per_request_lambda=lambdas,
    )


@torch.no_grad()
def paged_attention_dense(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    causal: bool = True,
) -> torch.Tensor:
    """Plain softmax attention over the paged cache, one request at a time, in fp32.

    No tiles, no online softmax: the naive definition the tiled oracle must equal
    when skipping is off. Returns ``[total_q, Hq, Dv]`` float32.
    """
    total_q, hq, d = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(total_q, hq, v_cache.shape[3], dtype=torch.float32, device=q.device)
    cu = cu_seqlens_q.tolist()
    for b, kv_len in enumerate(seq_lens.tolist()):
        q0, q1 = int(cu[b]), int(cu[b + 1])
        if q1 == q0:
            continue
        keys = gather_paged_kv(k_cache, block_table[b], kv_len).float().repeat_interleave(g, dim=1)
        vals = gather_paged_kv(v_cache, block_table[b], kv_len).float().repeat_interleave(g, dim=1)
        s = torch.einsum("thd,khd->htk", q[q0:q1].float(), keys) * scale
        if causal:
            t = torch.arange(q1 - q0, device=q.device)[:, None]
            j = torch.arange(kv_len, device=q.device)[None, :]
            s = s.masked_fill(j > kv_len - (q1 - q0) + t, float("-inf"))
        out[q0:q1] = torch.einsum("htk,khd->thd", torch.softmax(s, dim=-1), vals)
    return out
