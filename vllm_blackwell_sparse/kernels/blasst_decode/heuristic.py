"""The batch-dependent split heuristic that the request-only rule replaced (kept as the
speed baseline of the benchmarks; the backend never runs it)."""

from typing import NamedTuple

import torch

from vllm_blackwell_sparse.kernels.blasst_decode.limits import MAX_SPLITS, Q_TILE_ROWS, RESIDENT_WARPS_PER_SM
from vllm_blackwell_sparse.kernels.blasst_decode.splits import request_tiles

# A batch-dependent split heuristic, measured on the H200 (benchmarks/decode_tuning.py,
# decode_split_shapes.py). Not used by default any more: its shape depends on the batch
# (and under CUDA graphs on the capture's max_seq_len), so a request's skip decisions
# depended on its neighbours; it stays as the speed baseline of SplitRule.
# - when even 16-tile splits give fewer warps than one wave holds (small batches), use
#   them all, equal;
# - otherwise long-then-short splits: long splits that fill whole waves of resident
#   warps (4 waves when the batch has at least one (request, KV head, row tile) per SM,
#   else 2), then half as many splits a quarter as long, dispatched last;
# - equal splits, 5 waves' worth (none shorter than 32 tiles), instead when that would
#   give fewer than 2 long splits or short splits of fewer than 12 tiles.
LONG_SPLIT_WAVES_LARGE_BATCH = 4
LONG_SPLIT_WAVES_SMALL_BATCH = 2
LONG_SPLIT_RATIO = 4
SHORT_SPLITS_PER_LONG = 0.5
WAVES_LARGE_BATCH = 5
MIN_TILES_PER_SPLIT = 32
MIN_TILES_PER_SHORT_SPLIT = 12
MIN_TILES_PER_SPLIT_ONE_WAVE = 16
_SM_COUNT: dict[int, int] = {}


class SplitShape(NamedTuple):
    """An explicit split shape (``reference.split_tile_ranges``): every request's tiles cut
    into ``num_splits`` ranges, the first ``long_splits`` ``long_split_ratio`` times as long."""

    num_splits: int
    long_splits: int = 0
    long_split_ratio: int = 1


def split_shape_heuristic(batch: int, num_kv_heads: int, rows_per_kv_head: int, max_seq_len: int, device) -> SplitShape:
    """The batch-dependent shape for a batch whose longest request has ``max_seq_len`` keys
    (see the rules above; a benchmark baseline, not batch-invariant)."""
    idx = torch.device(device).index or 0
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    sms = _SM_COUNT[idx]
    warps = max(1, batch * num_kv_heads * -(-rows_per_kv_head // Q_TILE_ROWS))
    finest = splits_filling_waves(None, warps, max_seq_len, sms, MIN_TILES_PER_SPLIT_ONE_WAVE)
    if warps * finest <= sms * RESIDENT_WARPS_PER_SM:
        return SplitShape(finest)
    waves = LONG_SPLIT_WAVES_LARGE_BATCH if warps >= sms else LONG_SPLIT_WAVES_SMALL_BATCH
    long = splits_filling_waves(waves, warps, max_seq_len, sms, MIN_TILES_PER_SPLIT)
    short = int(SHORT_SPLITS_PER_LONG * long)
    short_tiles = -(-request_tiles(max_seq_len) // (LONG_SPLIT_RATIO * long + short))
    if long < 2 or long + short > MAX_SPLITS or short_tiles < MIN_TILES_PER_SHORT_SPLIT:
        return SplitShape(splits_filling_waves(WAVES_LARGE_BATCH, warps, max_seq_len, sms, MIN_TILES_PER_SPLIT))
    return SplitShape(long + short, long, LONG_SPLIT_RATIO)


def splits_filling_waves(waves: int | None, warps_per_split: int, max_seq_len: int, sm_count: int,
                         min_tiles_per_split: int) -> int:
    """Splits whose warps fill ``waves`` whole waves of resident warps (rounded down;
    None: no wave limit), capped so no split of the longest request has fewer than
    ``min_tiles_per_split`` tiles, and at ``MAX_SPLITS``."""
    cap = min(-(-request_tiles(max_seq_len) // min_tiles_per_split), MAX_SPLITS)
    if waves is None:
        return int(cap)
    return int(max(1, min(sm_count * RESIDENT_WARPS_PER_SM * waves // max(warps_per_split, 1), cap)))
