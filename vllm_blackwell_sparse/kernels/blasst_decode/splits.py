"""Split ranges of a request: the request-only :class:`SplitRule` (the default path)."""

from typing import NamedTuple

from vllm_blackwell_sparse.kernels.blasst_decode.limits import KV_TILE, MAX_SPLITS


class SplitRule(NamedTuple):
    """How a request's tiles are cut into splits, from the request's own length alone.

    A request of ``n`` tiles (``ceil(seq_len / KV_TILE)``) is cut, from tile 0, into ranges
    of ``max(min_tiles, ceil(n / target_splits))`` tiles; the last may be shorter, and a
    row tile whose causal range ends earlier (``next_n > 1``) has empty ranges at its end.
    Because nothing else enters, a request gets the same ranges, hence the same skip
    decisions and the same output bits, whatever else is in the batch and whether the
    call was captured in a CUDA graph for longer requests or run eagerly.
    """

    min_tiles: int
    target_splits: int

    def tiles_per_split(self, request_tiles: int) -> int:
        return max(self.min_tiles, -(-request_tiles // self.target_splits))

    def split_count(self, request_tiles: int) -> int:
        """Splits of a request of ``request_tiles`` tiles (at least one)."""
        return max(1, -(-request_tiles // self.tiles_per_split(request_tiles)))

    def max_split_count(self, longest_tiles: int) -> int:
        """The most splits of any request of at most ``longest_tiles`` tiles: the grid's
        split count. Not ``split_count(longest_tiles)``, which is not monotonic (1024
        tiles under (16, 64): 64 splits of 16; 1025: 61 of 17)."""
        return max(1, min(self.target_splits, -(-longest_tiles // self.min_tiles)))

    def check(self) -> "SplitRule":
        def whole(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not (whole(self.min_tiles) and 1 <= self.min_tiles <= 1 << 20):
            raise ValueError(f"SplitRule.min_tiles must be an integer in [1, 2^20], got {self.min_tiles!r}")
        if not (whole(self.target_splits) and 1 <= self.target_splits <= MAX_SPLITS):
            raise ValueError(f"SplitRule.target_splits must be an integer in [1, {MAX_SPLITS}], got {self.target_splits!r}")
        return self


# The default rule, chosen from one H200 run against the batch-dependent heuristic below
# (benchmarks/results/blasst_decode_split_rule_h200.json, docs/BENCHMARKS.md): splits of
# 16 tiles (256 keys) up to 64 splits, longer beyond 16K keys. Against the heuristic:
# within the timing noise at 1-8 requests of 4K-7K keys on SmolLM2's shape (9/3 heads, d
# 64), 1-6% slower at 64 requests and at 8-64 x 32K (32/8, d 128), 13% slower at 1 x 32K,
# where the heuristic's 128 splits fill the GPU. (32, 64) was 1.5x slower at 1-8 requests
# on SmolLM2's shape; (16, 128) and (8, 128) trade small batches against large ones.
DEFAULT_SPLIT_RULE = SplitRule(min_tiles=16, target_splits=64)


def request_tiles(seq_len: int) -> int:
    """KV tiles of a request of ``seq_len`` keys (at least one)."""
    return -(-max(seq_len, 1) // KV_TILE)
