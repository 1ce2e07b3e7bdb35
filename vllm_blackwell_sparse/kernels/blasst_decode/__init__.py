"""BLASST paged split-KV decode attention, in CuTe DSL.

Semantics are those of ``reference/blasst.py`` with ``kv_tile_size=KV_TILE``,
``q_tile_rows=Q_TILE_ROWS``, ``visit_order="ascending"`` and the same split ranges:
queries of ``next_n`` tokens per request (causal among them), GQA-packed rows
``r = t * G + g`` for one KV head, the request's tiles cut into contiguous ranges, each
with its own online softmax, merged by log-sum-exp. By default the ranges follow a
:class:`SplitRule`, which looks at the request's own length only, so a request's
decisions and output do not depend on the rest of the batch or on CUDA-graph capture
(the oracle's ``split_rule``); an explicit ``num_splits`` / ``long_splits`` /
``long_split_ratio`` shape is also accepted (the oracle's arguments of the same names).

Design (one warp per CTA, one CTA per (KV head x row tile, request, split))
---------------------------------------------------------------------------
Decode is memory-bound, so the kernel is built around the bytes: K and V are read with
128-bit accesses laid out directly as ``mma.sync.m16n8k16`` fragments, with no
cross-lane exchange. That works because both products reduce over an index we may
permute freely:

* ``S = Q K^T`` reduces over the head dim. Lane ``l`` holds, for key ``l // 4`` of each
  8-key half tile, the dims ``{32 i + 8 (l % 4) + e}``; the matching Q fragments use
  the same permutation of the head dim, so the dot products are unchanged and each K
  row is read as 16-byte pieces (4 lanes cover 64 contiguous bytes).
* ``O = P V`` produces the head dim, which we may permute on output. Lane ``l`` holds
  keys ``{2q, 2q+1, 2q+8, 2q+9}`` (``q = l % 4``, as the P fragment needs) and dims
  ``{64 i + 8 (l // 4) + e}`` of V; its accumulator ends up holding dims
  ``64 i + 16 q + [0, 16)``, written back with 128-bit stores.

K streams through a per-warp shared-memory ring of ``k_stages`` tiles filled by
``cp.async``: each lane copies exactly the 16-byte pieces it will later read as its own
fragment, so the ring needs no barrier, only the lane's own ``cp.async.wait_group``.
Keeping K tiles in flight without holding them in registers is what lets runs of
skipped tiles stream at close to full bandwidth (K one tile ahead in registers left
them latency-bound). Per 16-key tile: wait for its K, ``S`` from the ring, refill the
slot with the tile ``k_stages`` ahead, then the skip decision, and only for a kept tile
the V loads (straight into registers), the exponentials and ``P V`` -- whose product is
consumed one tile later, so the V load is in flight meanwhile. A skipped tile reads no
V byte.

The skip rule is evaluated in the log2 domain: scores are ``q.k * softmax_scale *
log2(e)``; the threshold ``log2(factor) - log2(seq_len)`` is computed per request in the
kernel, and skipping is off for a request whose threshold is ``>= 0`` (λ >= 1). The
factor is one scalar per launch, or one per request read from a float32 device tensor
(a CUDA graph then replays whatever the tensor holds: changing a factor compiles and
captures nothing). Rows past the packed rows (padding of the 16-row MMA tile) do not vote.

Outputs: with one split the normalised output is written in the query dtype; with more,
fp32 partial outputs and log2-domain LSEs per split, merged by the combine kernel.
"""

import math

from vllm_blackwell_sparse.kernels.blasst_decode.compile import compile_blasst_combine, compile_blasst_decode
from vllm_blackwell_sparse.kernels.blasst_decode.heuristic import (
    LONG_SPLIT_RATIO, LONG_SPLIT_WAVES_LARGE_BATCH, LONG_SPLIT_WAVES_SMALL_BATCH, MIN_TILES_PER_SHORT_SPLIT,
    MIN_TILES_PER_SPLIT, MIN_TILES_PER_SPLIT_ONE_WAVE, SHORT_SPLITS_PER_LONG, WAVES_LARGE_BATCH, SplitShape,
    split_shape_heuristic, splits_filling_waves,
)
from vllm_blackwell_sparse.kernels.blasst_decode.launch import blasst_decode, decode_workspace
from vllm_blackwell_sparse.kernels.blasst_decode.limits import (
    COMBINE_LOADS, COMBINE_THREADS, DEFAULT_K_STAGES, DEFAULT_MIN_WARPS_PER_SM, KV_TILE, LOG2E, MAX_K_STAGES,
    MAX_LONG_SPLIT_RATIO, MAX_NEXT_N, MAX_SPLITS, Q_TILE_ROWS, RESIDENT_WARPS_PER_SM, SUPPORTED_DTYPES, TIMELINE_STAMPS,
    SUPPORTED_HEAD_DIMS, can_implement, check_static,
)
from vllm_blackwell_sparse.kernels.blasst_decode.splits import DEFAULT_SPLIT_RULE, SplitRule, request_tiles

__all__ = [name for name, value in dict(globals()).items()
           if not name.startswith("_") and not isinstance(value, type(math))]
