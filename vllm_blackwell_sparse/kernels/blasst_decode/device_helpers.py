"""Device helpers of the BLASST decode and combine kernels (CuTe DSL)."""

import math

import cutlass
import cutlass.cute as cute

from vllm_blackwell_sparse.kernels.blasst_decode.limits import KV_TILE

NEG_INF = -math.inf


def quad_max(x):
    # The 4 lanes of a quad (l // 4 equal) hold one row's scores.
    x = cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=1))
    return cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=2))


def quad_sum(x):
    x = x + cute.arch.shuffle_sync_bfly(x, offset=1)
    return x + cute.arch.shuffle_sync_bfly(x, offset=2)


# SplitRule on the device: the same integer arithmetic as SplitRule.tiles_per_split /
# SplitRule.split_count, from the request's key count alone.

def rule_split_tiles(kv_len, min_tiles, target_splits):
    tiles = (cutlass.max(kv_len, 0) + KV_TILE - 1) // KV_TILE
    return cutlass.max(min_tiles, (tiles + target_splits - 1) // target_splits)


def rule_split_count(kv_len, tiles_per_split):
    tiles = (cutlass.max(kv_len, 0) + KV_TILE - 1) // KV_TILE
    return cutlass.max((tiles + tiles_per_split - 1) // tiles_per_split, 1)
