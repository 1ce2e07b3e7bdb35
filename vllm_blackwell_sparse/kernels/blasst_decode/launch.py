"""The host side of a BLASST decode call: checks (once per call signature), the split
grid, the workspace, the two launches."""

import math
from typing import NamedTuple

import torch

from vllm_blackwell_sparse.kernels.blasst_decode.compile import compile_blasst_combine, compile_blasst_decode
from vllm_blackwell_sparse.kernels.blasst_decode.limits import (
    DEFAULT_K_STAGES, DEFAULT_MIN_WARPS_PER_SM, LOG2E, MAX_LONG_SPLIT_RATIO, MAX_SPLITS, Q_TILE_ROWS, TIMELINE_STAMPS,
    check_static,
)
from vllm_blackwell_sparse.kernels.blasst_decode.splits import DEFAULT_SPLIT_RULE, SplitRule, request_tiles


def decode_workspace(num_splits: int, num_tokens: int, num_q_heads: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split partials: fp32 outputs ``[splits, tokens, Hq, D]`` and log2 LSEs ``[splits, tokens, Hq]``
    (two views of one allocation)."""
    rows = num_splits * num_tokens * num_q_heads
    buf = torch.empty(rows * (head_dim + 1), dtype=torch.float32, device=device)
    return (buf[:rows * head_dim].view(num_splits, num_tokens, num_q_heads, head_dim),
            buf[rows * head_dim:].view(num_splits, num_tokens, num_q_heads))


class _Launch(NamedTuple):
    """What one validated call signature launches (see ``_LAUNCHES``)."""

    decode: object
    combine: object | None  # None with one split: the decode kernel writes the output
    next_n: int
    grid_splits: int
    long_splits: int
    long_split_ratio: int
    rule_min_tiles: int  # 0: explicit shape
    rule_target_splits: int
    workspace_shape: tuple[int, int, int, int]
    count: bool
    record: bool


# Validated call signatures -> launch: the host-side checks of a signature run once, so
# the decode hot path (one call per layer and step) pays only a dictionary lookup and the
# per-call pointer checks before the two launches.
_LAUNCHES: dict[tuple, _Launch] = {}
MAX_CACHED_SIGNATURES = 4096


def _meta(t: torch.Tensor | None):
    """What of a tensor the validation depends on (its values excepted)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def blasst_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    softmax_scale: float,
    threshold_scale_factor: float | torch.Tensor | None = None,
    next_n: int | None = None,
    split_rule: SplitRule | None = None,
    num_splits: int | None = None,
    long_splits: int = 0,
    long_split_ratio: int = 1,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    skip_counts: torch.Tensor | None = None,
    decisions: torch.Tensor | None = None,
    timeline: bool = False,
    check_values: bool = False,
    min_warps_per_sm: int = DEFAULT_MIN_WARPS_PER_SM,
    k_stages: int = DEFAULT_K_STAGES,
) -> torch.Tensor:
    """Causal decode attention of ``q`` over a paged cache, skipping BLASST tiles.

    Args:
        q: ``[B * next_n, Hq, D]``, the ``next_n`` query tokens of each request in order
            (the last ``next_n`` positions of its sequence).
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]`` (separate planes; strides
            may be arbitrary multiples of 8 elements, head dim contiguous).
        block_table: int32 ``[B, max_blocks]``. seq_lens: int32 ``[B]``, the new tokens
            included; a request of length 0 yields zeros. Both on q's device.
        threshold_scale_factor: λ = factor / seq_len per request; None = dense decode. A
            float32 tensor ``[B]`` on q's device gives each request its own factor (``inf``:
            no skipping for that request; values must be > 0), read by the kernel at run
            time, so a captured graph follows whatever the tensor holds.
        next_n: query tokens per request; every request has the same number. Without it,
            ``q.shape[0] // B`` (the caller vouches for uniform query lengths).
        split_rule: the request-only split rule (:class:`SplitRule`, default
            ``DEFAULT_SPLIT_RULE``); the grid covers requests up to ``max_seq_len`` keys
            (default and at most ``max_blocks * block_size``, the longest the block table
            can address), so under CUDA graphs pass the longest length the graph may see.
        num_splits, long_splits, long_split_ratio: an explicit shape instead of the rule
            (``reference.split_tile_ranges``; benchmarks and tests): every request cut
            into ``num_splits`` ranges, the first ``long_splits`` of them
            ``long_split_ratio`` times as long as the rest.
        out: ``[B * next_n, Hq, D]`` output in q's dtype, 16-byte aligned. workspace: from
            :func:`decode_workspace` when more than one split. With both given the call
            allocates nothing (CUDA-graph capturable; without them it allocates from
            torch's caching allocator, which a capture also allows).
        skip_counts: int32 ``[B, 2]``; the kernel *adds* each request's (skipped,
            eligible) tile counts to it (zero it first).
        decisions: int32 ``[B, Hkv * row_tiles, max_tiles]`` (tests): for every eligible
            tile the kernel writes 1 (kept) or 2 (skipped) at its tile index; other
            entries are left as they are. ``row_tiles = ceil(next_n * Hq / Hkv / 8)``.
        timeline: (benchmarks) ``decisions`` receives each active CTA's ``TIMELINE_STAMPS``
            timestamps at ``[req, head_tile, split * TIMELINE_STAMPS:]`` instead (a variant
            compiled for it; needs a factor).
        check_values: also check what only the tensors' values show (lengths against the
            block table and ``max_seq_len``, block ids in range): a device sync, for
            debugging; skipped while a CUDA graph is being captured.
    """
    factor_tensor = isinstance(threshold_scale_factor, torch.Tensor)
    if not factor_tensor and threshold_scale_factor is not None and not (
            threshold_scale_factor > 0 and math.isfinite(threshold_scale_factor)):
        raise ValueError(f"threshold_scale_factor must be a finite number > 0, a float32 tensor [B] or None, "
                         f"got {threshold_scale_factor!r}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, Hkv, D], got shape {tuple(k_cache.shape)}")
    # The grid's split count, from the longest request the call may see: the block table
    # cannot address more than max_blocks * block_size keys.
    longest = block_table.shape[-1] * k_cache.shape[1]
    if max_seq_len is not None:
        if not 0 <= max_seq_len == int(max_seq_len):
            raise ValueError(f"max_seq_len must be an integer >= 0, got {max_seq_len!r}")
        longest = min(longest, int(max_seq_len))
    rule = None
    if num_splits is None:
        rule = SplitRule(*split_rule).check() if split_rule is not None else DEFAULT_SPLIT_RULE
        grid_splits = rule.max_split_count(request_tiles(longest))
    elif split_rule is not None:
        raise ValueError("give either split_rule or an explicit num_splits, not both")
    else:
        grid_splits = num_splits
    key = (
        _meta(q), _meta(k_cache), _meta(v_cache), _meta(block_table), _meta(seq_lens), _meta(out),
        None if workspace is None else (_meta(workspace[0]), _meta(workspace[1])), _meta(skip_counts), _meta(decisions),
        _meta(threshold_scale_factor) if factor_tensor else threshold_scale_factor is None, next_n, rule, grid_splits,
        long_splits, long_split_ratio, min_warps_per_sm, k_stages, timeline,
    )
    launch = _LAUNCHES.get(key)
    if launch is None:
        if len(_LAUNCHES) >= MAX_CACHED_SIGNATURES:  # eager batches of many shapes: start over, never grow unbounded
            _LAUNCHES.clear()
        launch = _validate(q, k_cache, v_cache, block_table, seq_lens, threshold_scale_factor, next_n, rule,
                           grid_splits, long_splits, long_split_ratio, out, workspace, skip_counts, decisions,
                           min_warps_per_sm, k_stages, timeline)
        _LAUNCHES[key] = launch
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t is not None and t.data_ptr() % 16:
            raise ValueError(f"{name} must be 16-byte aligned (data_ptr {t.data_ptr():#x})")
    if check_values and not torch.cuda.is_current_stream_capturing():
        _check_values(k_cache, block_table, seq_lens, launch, longest)
    if out is None:
        out = torch.empty_like(q)
    if workspace is None:
        workspace = decode_workspace(*launch.workspace_shape, q.device)
    elif launch.combine is not None and workspace[0].data_ptr() % 16:
        raise ValueError("the workspace's partial outputs must be 16-byte aligned")
    o_part, lse_part = workspace
    log2_factor = math.log2(threshold_scale_factor) if threshold_scale_factor is not None and not factor_tensor else 0.0
    launch.decode(
        q, k_cache, v_cache, block_table, seq_lens, out, o_part, lse_part,
        # Without counting / recording the kernel never reads these: seq_lens stands in.
        skip_counts.view(-1) if launch.count else seq_lens,
        decisions if launch.record else seq_lens.view(1, 1, -1),
        threshold_scale_factor if factor_tensor else lse_part.view(-1),  # a float32 stand-in the kernel never reads
        softmax_scale * LOG2E, log2_factor, launch.grid_splits, launch.long_splits, launch.long_split_ratio,
        launch.rule_min_tiles, launch.rule_target_splits,
    )
    if launch.combine is not None:
        launch.combine(o_part[:launch.grid_splits], lse_part[:launch.grid_splits], out, seq_lens, launch.next_n,
                       launch.rule_min_tiles, launch.rule_target_splits)
    return out


def _validate(q, k_cache, v_cache, block_table, seq_lens, threshold_scale_factor, next_n, rule: SplitRule | None,
              grid_splits, long_splits, long_split_ratio, out, workspace, skip_counts, decisions, min_warps_per_sm,
              k_stages, timeline=False) -> _Launch:
    """Every check that the tensors' metadata allows, once per call signature; returns the launch."""
    if rule is not None:
        if long_splits or long_split_ratio != 1:
            raise ValueError("long_splits / long_split_ratio need num_splits (an explicit shape); without it the "
                             "split rule decides")
        rule_min_tiles, rule_target_splits = rule.min_tiles, rule.target_splits
    else:
        num_splits = grid_splits
        if not 1 <= num_splits <= MAX_SPLITS or num_splits != int(num_splits):
            raise ValueError(f"num_splits must be an integer in [1, {MAX_SPLITS}], got {num_splits}")
        if not 0 <= long_splits <= num_splits or long_splits != int(long_splits):
            raise ValueError(f"long_splits must be an integer in [0, num_splits={num_splits}], got {long_splits}")
        if not 1 <= long_split_ratio <= MAX_LONG_SPLIT_RATIO or long_split_ratio != int(long_split_ratio):
            raise ValueError(f"long_split_ratio must be an integer in [1, {MAX_LONG_SPLIT_RATIO}], got {long_split_ratio}")
        grid_splits, long_splits, long_split_ratio = int(num_splits), int(long_splits), int(long_split_ratio)
        rule_min_tiles, rule_target_splits = 0, 1
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("q must be [tokens, Hq, D] and the caches [num_blocks, block_size, Hkv, D]")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have the same shape")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"q, k_cache and v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    batch = seq_lens.numel()
    tokens, hq, d = q.shape
    num_blocks, block_size, hkv, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"q head_dim {d} != cache head_dim {dk}")
    if hq % hkv:
        raise ValueError(f"num_q_heads ({hq}) must be a multiple of num_kv_heads ({hkv})")
    if next_n is None:
        if batch == 0 or tokens % batch:
            raise ValueError(f"q has {tokens} tokens, not a multiple of the {batch} requests (uniform decode only)")
        next_n = tokens // batch
    elif tokens != batch * next_n:
        raise ValueError(f"q has {tokens} tokens, but next_n={next_n} query tokens for each of the {batch} requests "
                         f"make {batch * next_n}")
    check_static(d, hq // hkv, next_n, block_size, q.dtype)
    if seq_lens.dtype != torch.int32 or seq_lens.dim() != 1 or block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise ValueError("seq_lens must be int32 [B] and block_table int32 [B, max_blocks]")
    if block_table.shape[0] != batch or block_table.stride(1) != 1:
        raise ValueError(f"block_table must be [B={batch}, max_blocks] with contiguous rows")
    if not seq_lens.is_contiguous():
        raise ValueError("seq_lens must be contiguous")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1 or any(s % 8 for s in t.stride()[:-1]):
            raise ValueError(f"{name} needs a contiguous head dim and strides that are multiples of 8")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1
                            or any(s % 8 for s in out.stride()[:-1])):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous head dim and strides that are "
                         "multiples of 8")
    final = grid_splits == 1
    workspace_shape = (grid_splits, tokens, hq, d) if not final else (1, 1, 1, d)
    if workspace is not None and not final:
        o_part, lse_part = workspace
        if (o_part.shape[0] < grid_splits or o_part.shape[1:] != (tokens, hq, d) or lse_part.shape != o_part.shape[:3]
                or o_part.dtype != torch.float32 or lse_part.dtype != torch.float32 or not o_part.is_contiguous()
                or not lse_part.is_contiguous() or o_part.device != q.device or lse_part.device != q.device):
            raise ValueError(f"workspace must be contiguous fp32 partials [>= {grid_splits}, {tokens}, {hq}, {d}] and "
                             f"LSEs [>= {grid_splits}, {tokens}, {hq}] on q's device, 16-byte aligned (decode_workspace)")
    if skip_counts is not None and (skip_counts.shape != (batch, 2) or skip_counts.dtype != torch.int32
                                    or not skip_counts.is_contiguous()):
        raise ValueError(f"skip_counts must be contiguous int32 [B={batch}, 2]")
    has_threshold = threshold_scale_factor is not None
    per_request = isinstance(threshold_scale_factor, torch.Tensor)
    if per_request and (threshold_scale_factor.dtype != torch.float32 or threshold_scale_factor.shape != (batch,)
                        or not threshold_scale_factor.is_contiguous()):
        raise ValueError(f"threshold_scale_factor as a tensor must be contiguous float32 [B={batch}], got "
                         f"{threshold_scale_factor.dtype} {tuple(threshold_scale_factor.shape)}")
    row_tiles = -(-next_n * (hq // hkv) // Q_TILE_ROWS)
    if decisions is not None and (decisions.dtype != torch.int32 or decisions.dim() != 3 or not decisions.is_contiguous()
                                  or decisions.shape[:2] != (batch, hkv * row_tiles)):
        raise ValueError(f"decisions must be contiguous int32 [B={batch}, {hkv * row_tiles}, max_tiles]")
    if q.device.type != "cuda":
        raise ValueError(f"q must be on a CUDA device, got {q.device}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_table", block_table), ("seq_lens", seq_lens),
                    ("out", out), ("skip_counts", skip_counts), ("decisions", decisions),
                    ("threshold_scale_factor", threshold_scale_factor if per_request else None)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: every tensor must be on q's device")
    count = skip_counts is not None and has_threshold
    record = decisions is not None and has_threshold
    if timeline and (not record or decisions.shape[2] < grid_splits * TIMELINE_STAMPS):
        raise ValueError(f"timeline needs a factor and decisions [B, {hkv * row_tiles}, >= {grid_splits * TIMELINE_STAMPS}]")
    decode = compile_blasst_decode(
        head_dim=d, group=hq // hkv, next_n=next_n, block_size=block_size, dtype=q.dtype,
        has_threshold=has_threshold, count_skips=count, record_decisions=record, final_output=final, timeline=timeline,
        min_warps_per_sm=min_warps_per_sm, k_stages=k_stages, factor_per_request=per_request,
    )
    combine = None if final else compile_blasst_combine(head_dim=d, dtype=q.dtype)
    return _Launch(decode, combine, next_n, grid_splits, long_splits, long_split_ratio, rule_min_tiles,
                   rule_target_splits, workspace_shape, count, record)


def _check_values(k_cache, block_table, seq_lens, launch: _Launch, longest: int) -> None:
    """The checks that need the tensors' values (``check_values=True``; syncs the device)."""
    lens = seq_lens.tolist()
    bs = k_cache.shape[1]
    for b, n in enumerate(lens):
        if n != 0 and not launch.next_n <= n <= longest:
            raise ValueError(f"seq_lens[{b}]={n}: expected 0 or [next_n={launch.next_n}, {longest}] (the block table "
                             f"addresses {block_table.shape[1] * bs} keys; max_seq_len caps that)")
        used = block_table[b, :-(-n // bs)]
        if used.numel() and not bool(((used >= 0) & (used < k_cache.shape[0])).all()):
            raise ValueError(f"block_table[{b}] holds block ids outside [0, {k_cache.shape[0]}) within its "
                             f"{used.numel()} used blocks")
