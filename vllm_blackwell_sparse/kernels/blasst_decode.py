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
from typing import NamedTuple

import torch

from vllm_blackwell_sparse.kernels import target_arch

KV_TILE = 16  # keys per tile: the unit of the skip decision
Q_TILE_ROWS = 8  # packed query rows per warp (MMA rows 0-7; rows 8-15 are padding)
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
MAX_NEXT_N = 8  # query tokens per request (spec decode verifies next_n - 1 drafts)
# Resident one-warp CTAs per SM the kernel is built for (the batch-dependent split
# heuristic counts on it), passed to ptxas as the occupancy hint: that allows up to 255 registers. Without
# any hint ptxas capped some variants (d 128, group 8, page 64, no threshold) at 168
# registers and spilled, and ran 25-30% slower.
RESIDENT_WARPS_PER_SM = 8
DEFAULT_MIN_WARPS_PER_SM = RESIDENT_WARPS_PER_SM
DEFAULT_K_STAGES = 2  # depth of each warp's shared-memory K ring (K tiles in flight); 2 measured best on the H200
MAX_K_STAGES = 8
LOG2E = 1.4426950408889634
MAX_LONG_SPLIT_RATIO = 64  # keeps the kernel's 32-bit tile arithmetic far from overflow
MAX_SPLITS = 256  # split-KV ranges per (request, KV head); the combine reads one LSE per thread
COMBINE_THREADS = MAX_SPLITS
COMBINE_LOADS = 8  # 16-byte partial loads per thread in flight at once in the combine

_COMPILED: dict[tuple, object] = {}


def _kernel_module():
    """Build the CuTe-DSL kernel classes lazily (the DSL is imported only when needed)."""
    import cutlass
    import cutlass.cute as cute
    from cutlass import Boolean, Float32, Int32, const_expr

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

    class BlasstDecodeSm90:
        """One warp per (KV head x 8-row tile, request, split); see the module docstring.

        Compile-time: head dim, GQA group size, query tokens per request, page size,
        dtype, whether a threshold is compiled in (and read per request from a tensor),
        whether skip counters are written,
        and whether the output is final (one split) or partial.
        """

        def __init__(self, head_dim, group, next_n, block_size, dtype, has_threshold, count_skips, record_decisions,
                     final_output, min_warps_per_sm, k_stages, factor_per_request=False):
            self.d = head_dim
            self.group = group
            self.next_n = next_n
            self.rows = group * next_n  # packed rows of one (request, KV head)
            self.q_tiles = -(-self.rows // Q_TILE_ROWS)
            self.block_size = block_size
            self.dtype = dtype
            self.has_threshold = has_threshold
            self.factor_per_request = factor_per_request
            self.count_skips = count_skips
            self.record_decisions = record_decisions
            self.min_warps_per_sm = min_warps_per_sm
            self.k_stages = k_stages
            self.final_output = final_output
            self.k_loads = head_dim // 32  # 16-byte K loads per key and lane
            self.k_chunks = head_dim // 16  # k16 steps of Q K^T
            self.v_loads = head_dim // 64  # 16-byte V loads per key and lane
            self.o_tiles = head_dim // 8  # n8 tiles of P V
            # K ring of one warp: (8 elements, lane, 16-byte piece of the lane, slot).
            self.ring_shape = (8, 32, 2 * self.k_loads, k_stages)

        def smem_carveout_percent(self):
            # Enough shared memory for the resident warps' K rings (plus the 1 KiB the
            # driver reserves per CTA), as a share of the 228 KiB of an sm90/sm100 SM.
            # Explicit, because the DSL's own estimate queries a GPU at compile time.
            ring = math.prod(self.ring_shape) * self.dtype.width // 8
            warps = max(self.min_warps_per_sm, 1)
            return min(100, -(-100 * warps * (ring + 1024) // (228 * 1024)))

        @cute.jit
        def __call__(self, mQ, mK, mV, mBlockTable, mSeqLens, mOut, mOPart, mLsePart, mCounts, mDecisions,
                     mFactors, scale_log2: Float32, log2_factor: Float32, num_splits: Int32, long_splits: Int32,
                     long_split_ratio: Int32, rule_min_tiles: Int32, rule_target_splits: Int32, stream):
            # Split index slowest: CTAs are dispatched in launch order, so every request's
            # first splits run first and the last wave is made of the last splits.
            self.kernel(mQ, mK, mV, mBlockTable, mSeqLens, mOut, mOPart, mLsePart, mCounts, mDecisions,
                        mFactors, scale_log2, log2_factor, num_splits, long_splits, long_split_ratio, rule_min_tiles,
                        rule_target_splits).launch(
                grid=[mK.shape[2] * self.q_tiles, mSeqLens.shape[0], num_splits], block=[32, 1, 1], stream=stream,
                min_blocks_per_mp=self.min_warps_per_sm, preferred_smem_carveout=self.smem_carveout_percent(),
            )

        @cute.kernel
        def kernel(self, mQ, mK, mV, mBlockTable, mSeqLens, mOut, mOPart, mLsePart, mCounts, mDecisions,
                   mFactors, scale_log2: Float32, log2_factor: Float32, num_splits: Int32, long_splits: Int32,
                   long_split_ratio: Int32, rule_min_tiles: Int32, rule_target_splits: Int32):
            lane, _, _ = cute.arch.thread_idx()
            head_tile, req, split = cute.arch.block_idx()
            kv_head = head_tile // self.q_tiles
            q_tile = head_tile % self.q_tiles
            quad = lane % 4  # q in the module docstring
            lrow = lane // 4

            kv_len = mSeqLens[req]
            # The packed row whose scores / outputs this lane holds (MMA rows 8-15 are
            # padding: their Q is zero and their results are dropped).
            row = q_tile * Q_TILE_ROWS + lrow
            live = row < self.rows
            tok = cutlass.min(row, self.rows - 1) // self.group
            head = kv_head * self.group + cutlass.min(row, self.rows - 1) % self.group
            token = req * self.next_n + tok
            limit = kv_len - self.next_n + tok + 1  # keys [0, limit) are visible (causal)
            last_tok = cutlass.min(q_tile * Q_TILE_ROWS + Q_TILE_ROWS - 1, self.rows - 1) // self.group
            kv_end = kv_len - self.next_n + last_tok + 1
            n_tiles = cutlass.max(kv_end + KV_TILE - 1, 0) // KV_TILE
            t_begin = Int32(0)
            t_end = Int32(0)
            active = Boolean(True)
            if rule_min_tiles > 0:
                # The request-only rule (SplitRule): ranges of a length fixed by the
                # request's own key count; the grid covers the longest possible request
                # and the CTAs past this request's split count leave at once.
                tiles_per_split = rule_split_tiles(kv_len, rule_min_tiles, rule_target_splits)
                active = split < rule_split_count(kv_len, tiles_per_split)
                t_begin = cutlass.min(split * tiles_per_split, n_tiles)
                t_end = cutlass.min(t_begin + tiles_per_split, n_tiles)
                if split == num_splits - 1:
                    # A request longer than the grid was sized for (a caller's max_seq_len
                    # too small) still gets all its keys: the grid's last split takes the
                    # rest. Never taken when the grid covers the request.
                    t_end = n_tiles
            else:
                # An explicit shape (reference.split_tile_ranges): the first long_splits
                # ranges are long_split_ratio units long, the rest one unit.
                units = long_split_ratio * long_splits + num_splits - long_splits
                unit = (n_tiles + units - 1) // units
                t_begin = long_splits * long_split_ratio * unit + (split - long_splits) * unit
                size = unit
                if split < long_splits:
                    t_begin = split * long_split_ratio * unit
                    size = long_split_ratio * unit
                t_begin = cutlass.min(t_begin, n_tiles)
                t_end = cutlass.min(t_begin + size, n_tiles)

            smem = cutlass.utils.SmemAllocator()
            ring = smem.allocate_tensor(self.dtype, cute.make_layout(self.ring_shape), byte_alignment=16)
            if active:
                self.run_split(mQ, mK, mV, mBlockTable, mOut, mOPart, mLsePart, mCounts, mDecisions, mFactors, ring,
                               scale_log2, log2_factor, t_begin, t_end, kv_len, req, split, head_tile, kv_head,
                               lane, lrow, quad, live, token, head, limit)

        @cute.jit
        def run_split(self, mQ, mK, mV, mBlockTable, mOut, mOPart, mLsePart, mCounts, mDecisions, mFactors, ring,
                      scale_log2, log2_factor, t_begin, t_end, kv_len, req, split, head_tile, kv_head,
                      lane, lrow, quad, live, token, head, limit):
            """Tiles ``[t_begin, t_end)`` of one (request, KV head x row tile): online softmax
            with the skip rule, then the split's output (final or partial)."""
            # Q fragments (A operand), head dim permuted as described above.
            qv = cute.make_rmem_tensor((8, self.k_loads), self.dtype)
            qv.fill(0.0)
            if live:
                qrow = cute.zipped_divide(mQ[token, head, None], (8,))
                for i in cutlass.range_constexpr(self.k_loads):
                    cute.autovec_copy(qrow[None, 4 * i + quad], qv[None, i])
            qa = []
            for c in cutlass.range_constexpr(self.k_chunks):
                a = cute.make_rmem_tensor((8, 1, 1), self.dtype)
                a.fill(0.0)
                i, e = c // 2, 4 * (c % 2)
                a[0, 0, 0] = qv[e, i]
                a[1, 0, 0] = qv[e + 1, i]
                a[4, 0, 0] = qv[e + 2, i]
                a[5, 0, 0] = qv[e + 3, i]
                qa.append(a)

            # Skip threshold of this request, log2 domain; skipping is off when >= 0.
            thr = Float32(0.0)
            skipping = Boolean(False)
            if const_expr(self.has_threshold):
                lf = log2_factor
                if const_expr(self.factor_per_request):
                    # +inf (a request with skipping off) gives thr = +inf: no skipping.
                    lf = cute.math.log2(Float32(mFactors[req]), fastmath=False)
                thr = lf - cute.math.log2(Float32(cutlass.max(kv_len, 1)), fastmath=False)
                skipping = thr < Float32(0.0)

            state = self.State(self)
            bs = self.block_size
            last_block = cutlass.max(kv_len - 1, 0) // bs
            # K ring: lane-private, so lane l writes (cp.async) and later reads only its own
            # 16-byte pieces, and completing its own cp.async groups is all the sync needed.
            # One group per tile, empty past the split's end, so the group count stays uniform.
            state.sK = ring
            state.g2s = cute.make_copy_atom(
                cute.nvgpu.cpasync.CopyG2SOp(cache_mode=cute.nvgpu.cpasync.LoadCacheMode.GLOBAL), self.dtype,
                num_bits_per_copy=128,
            )
            for j in cutlass.range_constexpr(self.k_stages):
                if t_begin + j < t_end:
                    pg = mBlockTable[req, ((t_begin + j) * KV_TILE) // bs]
                    self.issue_k(mK, state, pg, ((t_begin + j) * KV_TILE) % bs, (t_begin + j) % self.k_stages,
                                 kv_head, lane, lrow, quad)
                cute.arch.cp_async_commit_group()
            # The page of the next tile to issue, looked up a tile early so the issue never
            # waits on the block table.
            page_ahead = Int32(0)
            if t_begin < t_end:
                page_ahead = mBlockTable[req, cutlass.min(((t_begin + self.k_stages) * KV_TILE) // bs, last_block)]

            m_run = Float32(NEG_INF)
            l_run = Float32(0.0)
            n_skipped = Int32(0)
            n_eligible = Int32(0)
            pending_a = Boolean(False)
            pending_b = Boolean(False)
            alpha_a = Float32(1.0)
            alpha_b = Float32(1.0)
            # Two tiles per iteration so the V registers of the tile in flight (A or B)
            # and of the tile being consumed are static.
            for t in cutlass.range(t_begin, t_end, 2, unroll=1):
                (page_ahead, m_run, l_run, n_skipped, n_eligible, pending_a, alpha_a, pending_b) = self.tile_step(
                    mK, mV, mBlockTable, mDecisions, state, qa, state.v_a, state.p_a, state.v_b, state.p_b,
                    t, t_begin, t_end, req, head_tile, kv_head, lane, lrow, quad, live, limit, kv_len, last_block,
                    page_ahead, m_run, l_run, n_skipped, n_eligible, pending_b, alpha_b,
                    scale_log2, thr, skipping,
                )
                if t + 1 < t_end:
                    (page_ahead, m_run, l_run, n_skipped, n_eligible, pending_b, alpha_b, pending_a) = self.tile_step(
                        mK, mV, mBlockTable, mDecisions, state, qa, state.v_b, state.p_b, state.v_a, state.p_a,
                        t + 1, t_begin, t_end, req, head_tile, kv_head, lane, lrow, quad, live, limit, kv_len, last_block,
                        page_ahead, m_run, l_run, n_skipped, n_eligible, pending_a, alpha_a,
                        scale_log2, thr, skipping,
                    )
            if const_expr(not self.final_output):
                # Only the epilogue is left: let the combine kernel (launched as a
                # programmatic dependent) be scheduled now; it waits for this grid's end.
                cute.arch.griddepcontrol_launch_dependents()
            cute.arch.cp_async_wait_group(0)
            if pending_a:
                self.consume(state, state.v_a, state.p_a, alpha_a)
            if pending_b:
                self.consume(state, state.v_b, state.p_b, alpha_b)

            l_sum = quad_sum(l_run)
            if const_expr(self.count_skips):
                if lane == 0:
                    cute.arch.atomic_add(mCounts.iterator + 2 * req, n_skipped)
                    cute.arch.atomic_add(mCounts.iterator + 2 * req + 1, n_eligible)
            if live:
                self.store_row(mOut, mOPart, mLsePart, state.o, l_sum, m_run, split, token, head, quad)

        class State:
            """Register tensors of one warp (rmem; indices are static so they stay in registers)."""

            def __init__(self, k):
                self.kfrag = cute.make_rmem_tensor((8, k.k_loads, 2), k.dtype)  # K of the tile being scored
                self.v_a = cute.make_rmem_tensor((8, k.v_loads, 4), k.dtype)  # V of even / odd steps
                self.v_b = cute.make_rmem_tensor((8, k.v_loads, 4), k.dtype)
                self.p_a = cute.make_rmem_tensor((8, 1, 1), k.dtype)  # P (A operand) waiting for its V
                self.p_b = cute.make_rmem_tensor((8, 1, 1), k.dtype)
                self.p_a.fill(0.0)
                self.p_b.fill(0.0)
                self.o = cute.make_rmem_tensor((k.o_tiles, 2), Float32)  # this lane's row of O
                self.o.fill(0.0)
                self.atom = cute.make_mma_atom(cute.nvgpu.warp.MmaF16BF16Op(k.dtype, Float32, (16, 8, 16)))

        @cute.jit
        def tile_step(self, mK, mV, mBlockTable, mDecisions, state, qa, v_this, p_this, v_prev, p_prev,
                      t, t_begin, t_end, req, head_tile, kv_head, lane, lrow, quad, live, limit, kv_len, last_block,
                      page_ahead, m_run, l_run, n_skipped, n_eligible, pending_prev, alpha_prev,
                      scale_log2, thr, skipping):
            """Tile ``t``: scores from its ring slot, the slot's refill, the skip decision,
            then (kept) this tile's V loads and P; then P.V of the previous kept tile, whose
            V has been in flight meanwhile. Returns the updated scalar state."""
            bs = self.block_size
            page = mBlockTable[req, (t * KV_TILE) // bs]  # for this tile's V (read before: an L1 hit)
            # Tile t's group is complete once at most k_stages - 1 younger ones are pending.
            cute.arch.cp_async_wait_group(self.k_stages - 1)
            slot = t % self.k_stages
            for h in cutlass.range_constexpr(2):
                for i in cutlass.range_constexpr(self.k_loads):
                    cute.autovec_copy(state.sK[None, lane, h * self.k_loads + i, slot], state.kfrag[None, i, h])
            # Two accumulators per 8-key half (even / odd k16 chunks), added at the end: four
            # independent MMA chains instead of two halve the latency of a tile's scores
            # (measured 0-1% faster on the H200, never slower).
            s = cute.make_rmem_tensor((2, 4, 1, 1), Float32)
            s.fill(0.0)
            s_odd = cute.make_rmem_tensor((2, 4, 1, 1), Float32)
            s_odd.fill(0.0)
            for h in cutlass.range_constexpr(2):
                for c in cutlass.range_constexpr(self.k_chunks):
                    b = cute.make_rmem_tensor((4, 1, 1), self.dtype)
                    i, e = c // 2, 4 * (c % 2)
                    for j in cutlass.range_constexpr(4):
                        b[j, 0, 0] = state.kfrag[e + j, i, h]
                    acc = s if c % 2 == 0 else s_odd
                    cute.gemm(state.atom, acc[h, None, None, None], qa[c], b, acc[h, None, None, None])
            for h in cutlass.range_constexpr(2):
                for j in cutlass.range_constexpr(2):
                    s[h, j, 0, 0] = s[h, j, 0, 0] + s_odd[h, j, 0, 0]

            # Refill the slot just read with tile t + k_stages: the MMAs above have consumed
            # its registers. Then look up the page of the tile after it.
            ahead = t + self.k_stages
            if ahead < t_end:
                self.issue_k(mK, state, page_ahead, (ahead * KV_TILE) % bs, slot, kv_head, lane, lrow, quad)
            cute.arch.cp_async_commit_group()
            page_after = mBlockTable[req, cutlass.min(((ahead + 1) * KV_TILE) // bs, last_block)]

            # Scale to the log2 domain, mask, row max (the 4 lanes of a quad share a row).
            m_loc = Float32(NEG_INF)
            for h in cutlass.range_constexpr(2):
                for j in cutlass.range_constexpr(2):
                    key = t * KV_TILE + 2 * quad + 8 * h + j
                    v = Float32(cutlass.select_(key < limit, s[h, j, 0, 0] * scale_log2, Float32(NEG_INF)))
                    s[h, j, 0, 0] = v
                    m_loc = cute.arch.fmax(m_loc, v)
            m_loc = quad_max(m_loc)

            keep = Boolean(True)
            if const_expr(self.has_threshold):
                if t != t_begin:
                    n_eligible += 1
                    if skipping:
                        # A row votes keep when its tile max is within the threshold of its
                        # running max (a row that saw no key yet keeps any finite max);
                        # padding rows do not vote.
                        keep = cute.arch.vote_any_sync(live & (m_loc > Float32(NEG_INF)) & (m_loc - m_run >= thr))
                        if not keep:
                            n_skipped += 1
                    if const_expr(self.record_decisions):
                        if lane == 0:
                            mDecisions[req, head_tile, t] = Int32(cutlass.select_(keep, 1, 2))

            alpha = Float32(1.0)
            if keep:
                self.load_v(mV, v_this, page, (t * KV_TILE) % bs, kv_head, lrow, quad, t * KV_TILE, kv_len)
                m_new = cute.arch.fmax(m_run, m_loc)
                base = Float32(cutlass.select_(m_new == Float32(NEG_INF), Float32(0.0), m_new))
                alpha = cute.math.exp2(m_run - base, fastmath=True)
                row_sum = Float32(0.0)
                for h in cutlass.range_constexpr(2):
                    for j in cutlass.range_constexpr(2):
                        pv = cute.math.exp2(s[h, j, 0, 0] - base, fastmath=True)
                        row_sum += pv
                        p_this[4 * h + j, 0, 0] = pv.to(self.dtype)
                l_run = l_run * alpha + row_sum
                m_run = m_new
            if pending_prev:
                self.consume(state, v_prev, p_prev, alpha_prev)
            return page_after, m_run, l_run, n_skipped, n_eligible, keep, alpha, Boolean(False)

        @cute.jit
        def consume(self, state, v_frag, p_frag, alpha):
            """O = O * alpha + P V for one kept tile (this lane's row; rows 8-15 dropped)."""
            for n in cutlass.range_constexpr(self.o_tiles):
                b = cute.make_rmem_tensor((4, 1, 1), self.dtype)
                i, e = n // 8, n % 8
                for j in cutlass.range_constexpr(4):
                    b[j, 0, 0] = v_frag[e, i, j]
                acc = cute.make_rmem_tensor((4, 1, 1), Float32)
                acc[0, 0, 0] = state.o[n, 0] * alpha
                acc[1, 0, 0] = state.o[n, 1] * alpha
                acc[2, 0, 0] = Float32(0.0)
                acc[3, 0, 0] = Float32(0.0)
                cute.gemm(state.atom, acc, p_frag, b, acc)
                state.o[n, 0] = acc[0, 0, 0]
                state.o[n, 1] = acc[1, 0, 0]

        @cute.jit
        def issue_k(self, mK, state, page, in_page, slot, kv_head, lane, lrow, quad):
            # Lane: key lrow of each 8-key half, dims {32 i + 8 quad + e}, into this lane's
            # 16-byte pieces of the ring slot.
            for h in cutlass.range_constexpr(2):
                krow = cute.zipped_divide(mK[page, in_page + 8 * h + lrow, kv_head, None], (8,))
                for i in cutlass.range_constexpr(self.k_loads):
                    cute.copy(state.g2s, krow[None, 4 * i + quad], state.sK[None, lane, h * self.k_loads + i, slot])

        @cute.jit
        def load_v(self, mV, vfrag, page, in_page, kv_head, lrow, quad, tile_key0, kv_len):
            # Lane: keys {2 quad, 2 quad + 1, 2 quad + 8, 2 quad + 9}, dims {64 i + 8 lrow + e}.
            for j in cutlass.range_constexpr(4):
                key = 2 * quad + (j % 2) + 8 * (j // 2)
                vrow = cute.zipped_divide(mV[page, in_page + key, kv_head, None], (8,))
                for i in cutlass.range_constexpr(self.v_loads):
                    cute.autovec_copy(vrow[None, 8 * i + lrow], vfrag[None, i, j])
            # Keys past the request's length hold whatever the page held before (vLLM reuses
            # freed blocks as they are): their P is 0, but 0 * Inf or 0 * NaN in the MMA is
            # NaN, so their V is zeroed. Only the request's last tile has such keys.
            if tile_key0 + KV_TILE > kv_len:
                for j in cutlass.range_constexpr(4):
                    if tile_key0 + 2 * quad + (j % 2) + 8 * (j // 2) >= kv_len:
                        for i in cutlass.range_constexpr(self.v_loads):
                            for e in cutlass.range_constexpr(8):
                                vfrag[e, i, j] = Float32(0.0).to(self.dtype)

        @cute.jit
        def store_row(self, mOut, mOPart, mLsePart, o, l_sum, m_run, split, token, head, quad):
            # o[n, j] holds dim 64 (n // 8) + 16 quad + 8 j + n % 8 of this lane's row.
            inv = Float32(cutlass.select_(l_sum > Float32(0.0), Float32(1.0) / l_sum, Float32(0.0)))
            if const_expr(self.final_output):
                vals = cute.make_rmem_tensor((8, 2 * self.v_loads), self.dtype)
                for n in cutlass.range_constexpr(self.o_tiles):
                    for j in cutlass.range_constexpr(2):
                        vals[n % 8, 2 * (n // 8) + j] = (o[n, j] * inv).to(self.dtype)
                orow = cute.zipped_divide(mOut[token, head, None], (8,))
                for i in cutlass.range_constexpr(self.v_loads):
                    for j in cutlass.range_constexpr(2):
                        cute.autovec_copy(vals[None, 2 * i + j], orow[None, 8 * i + 2 * quad + j])
            else:
                vals = cute.make_rmem_tensor((8, 2 * self.v_loads), Float32)
                for n in cutlass.range_constexpr(self.o_tiles):
                    for j in cutlass.range_constexpr(2):
                        vals[n % 8, 2 * (n // 8) + j] = o[n, j] * inv
                orow = cute.zipped_divide(mOPart[split, token, head, None], (8,))
                for i in cutlass.range_constexpr(self.v_loads):
                    for j in cutlass.range_constexpr(2):
                        cute.autovec_copy(vals[None, 2 * i + j], orow[None, 8 * i + 2 * quad + j])
                if quad == 0:
                    lse = Float32(cutlass.select_(
                        l_sum > Float32(0.0), m_run + cute.math.log2(l_sum, fastmath=True), Float32(NEG_INF)
                    ))
                    mLsePart[split, token, head] = lse

    class BlasstCombine:
        """Merge split partials: one CTA of ``COMBINE_THREADS`` per (token, query head).

        The merge is latency-bound (a few KB per CTA), so it is laid out to pay few
        memory round trips: every split's LSE is read at once (one per thread) and
        turned into a weight in shared memory; then the threads form groups of
        ``head_dim / 4`` lanes (16 bytes of the row each), group ``g`` summing splits
        ``g, g + groups, ...``, and the groups' sums are added in shared memory in a
        fixed order (deterministic). Launched with programmatic dependent launch: it
        is scheduled while the decode grid finishes and waits for it with
        ``griddepcontrol.wait`` before reading a partial.
        """

        def __init__(self, head_dim, dtype, use_pdl):
            self.d = head_dim
            self.dtype = dtype
            self.use_pdl = use_pdl
            self.lanes_per_row = head_dim // 4
            self.groups = COMBINE_THREADS // self.lanes_per_row
            self.warps = COMBINE_THREADS // 32

        @cute.jit
        def __call__(self, mOPart, mLsePart, mOut, mSeqLens, next_n: Int32, rule_min_tiles: Int32,
                     rule_target_splits: Int32, stream):
            self.kernel(mOPart, mLsePart, mOut, mSeqLens, next_n, rule_min_tiles, rule_target_splits).launch(
                grid=[mOut.shape[0], mOut.shape[1], 1], block=[COMBINE_THREADS, 1, 1], stream=stream,
                use_pdl=self.use_pdl,
            )

        @cute.kernel
        def kernel(self, mOPart, mLsePart, mOut, mSeqLens, next_n: Int32, rule_min_tiles: Int32,
                   rule_target_splits: Int32):
            tid, _, _ = cute.arch.thread_idx()
            token, head, _ = cute.arch.block_idx()
            warp, lane = tid // 32, tid % 32
            num_splits = Int32(mOPart.shape[0])
            if rule_min_tiles > 0:
                # Only the request's own splits were written (the decode kernel's rule).
                kv_len = mSeqLens[token // next_n]
                num_splits = cutlass.min(
                    num_splits, rule_split_count(kv_len, rule_split_tiles(kv_len, rule_min_tiles, rule_target_splits)))
            smem = cutlass.utils.SmemAllocator()
            sWeight = smem.allocate_tensor(Float32, cute.make_layout(MAX_SPLITS), byte_alignment=16)
            sMax = smem.allocate_tensor(Float32, cute.make_layout(self.warps), byte_alignment=16)
            sSum = smem.allocate_tensor(Float32, cute.make_layout(self.warps), byte_alignment=16)
            sPart = smem.allocate_tensor(Float32, cute.make_layout((self.d, self.groups)), byte_alignment=16)
            if const_expr(self.use_pdl):
                cute.arch.griddepcontrol_wait()

            lse = Float32(NEG_INF)
            if tid < num_splits:
                lse = mLsePart[tid, token, head]
            m = cute.arch.warp_reduction(lse, cute.arch.fmax)
            if lane == 0:
                sMax[warp] = m
            cute.arch.barrier()
            m = sMax[0]
            for i in cutlass.range_constexpr(1, self.warps):
                m = cute.arch.fmax(m, sMax[i])
            base = Float32(cutlass.select_(m == Float32(NEG_INF), Float32(0.0), m))
            w = cute.math.exp2(lse - base, fastmath=True)  # 0 for an empty split (LSE -inf)
            sWeight[tid] = w
            w = cute.arch.warp_reduction_sum(w)
            if lane == 0:
                sSum[warp] = w
            cute.arch.barrier()
            wsum = sSum[0]
            for i in cutlass.range_constexpr(1, self.warps):
                wsum += sSum[i]

            group, piece = tid // self.lanes_per_row, tid % self.lanes_per_row
            acc = cute.make_rmem_tensor((4,), Float32)
            acc.fill(0.0)
            # Rounds of COMBINE_LOADS predicated loads: all of a round's loads are in flight
            # together (a runtime-count unrolled loop would leave a serial remainder).
            frags = cute.make_rmem_tensor((4, COMBINE_LOADS), Float32)
            for first in cutlass.range(group, num_splits, self.groups * COMBINE_LOADS, unroll=1):
                frags.fill(0.0)
                for j in cutlass.range_constexpr(COMBINE_LOADS):
                    sp = first + j * self.groups
                    if sp < num_splits:
                        cute.autovec_copy(cute.zipped_divide(mOPart[sp, token, head, None], (4,))[None, piece],
                                          frags[None, j])
                for j in cutlass.range_constexpr(COMBINE_LOADS):
                    sp = cutlass.min(first + j * self.groups, num_splits - 1)
                    wt = Float32(cutlass.select_(first + j * self.groups < num_splits, sWeight[sp], Float32(0.0)))
                    for e in cutlass.range_constexpr(4):
                        acc[e] += wt * frags[e, j]
            cute.autovec_copy(acc, cute.zipped_divide(sPart[None, group], (4,))[None, piece])
            cute.arch.barrier()
            if tid < self.d:
                total = sPart[tid, 0]
                for g in cutlass.range_constexpr(1, self.groups):
                    total += sPart[tid, g]
                out = Float32(cutlass.select_(wsum > Float32(0.0), total / wsum, Float32(0.0)))
                mOut[token, head, tid] = out.to(self.dtype)

    return BlasstDecodeSm90, BlasstCombine


def _cute_dtype(dtype: torch.dtype):
    import cutlass

    return {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16}[dtype]


def compile_blasst_decode(
    *,
    head_dim: int,
    group: int,
    next_n: int,
    block_size: int,
    dtype: torch.dtype,
    has_threshold: bool,
    count_skips: bool,
    final_output: bool,
    record_decisions: bool = False,
    min_warps_per_sm: int = DEFAULT_MIN_WARPS_PER_SM,
    k_stages: int = DEFAULT_K_STAGES,
    factor_per_request: bool = False,
):
    """Compile (once per variant and target arch) the decode kernel; ``factor_per_request``:
    the factor comes from a float32 tensor ``[B]`` instead of the scalar argument.

    Fake tensors with symbolic sizes and strides: one compiled kernel serves every batch,
    cache size and split count, and no GPU is needed to build it (the target is
    ``CUTE_DSL_ARCH`` when set, else the current GPU's).
    """
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream, make_fake_tensor

    _check_static(head_dim, group, next_n, block_size, dtype)
    if not 1 <= k_stages <= MAX_K_STAGES:
        raise ValueError(f"k_stages must be in [1, {MAX_K_STAGES}], got {k_stages}")
    factor_per_request = bool(factor_per_request and has_threshold)
    key = ("decode", head_dim, group, next_n, block_size, dtype, has_threshold, count_skips, record_decisions,
           final_output, min_warps_per_sm, k_stages, factor_per_request, target_arch())
    if key in _COMPILED:
        return _COMPILED[key]
    decode_cls, _ = _kernel_module()
    op = decode_cls(
        head_dim, group, next_n, block_size, _cute_dtype(dtype), has_threshold, count_skips, record_decisions, final_output,
        min_warps_per_sm, k_stages, factor_per_request,
    )
    el = _cute_dtype(dtype)

    def sym8():
        # 64-bit: a layer's cache easily exceeds 2^31 elements.
        return cute.sym_int(64, divisibility=8)

    tokens, hkv, nblocks, splits, batch, max_blocks = (cute.sym_int() for _ in range(6))
    hq = cute.sym_int()
    q = make_fake_tensor(el, (tokens, hq, head_dim), stride=(sym8(), sym8(), 1), assumed_align=16)
    kc = make_fake_tensor(el, (nblocks, block_size, hkv, head_dim), stride=(sym8(), sym8(), sym8(), 1), assumed_align=16)
    vc = make_fake_tensor(el, (nblocks, block_size, hkv, head_dim), stride=(sym8(), sym8(), sym8(), 1), assumed_align=16)
    bt = make_fake_tensor(cutlass.Int32, (batch, max_blocks), stride=(cute.sym_int(), 1), assumed_align=4)
    lens = make_fake_compact_tensor(cutlass.Int32, (batch,))
    out = make_fake_tensor(el, (tokens, hq, head_dim), stride=(sym8(), sym8(), 1), assumed_align=16)
    # Own symbols: with one split the kernel writes ``out`` and a small stand-in is passed.
    p_tokens, p_hq = cute.sym_int(), cute.sym_int()
    o_part = make_fake_compact_tensor(cutlass.Float32, (splits, p_tokens, p_hq, head_dim), stride_order=(3, 2, 1, 0), assumed_align=16)
    lse_part = make_fake_compact_tensor(cutlass.Float32, (splits, p_tokens, p_hq), stride_order=(2, 1, 0))
    counts = make_fake_compact_tensor(cutlass.Int32, (cute.sym_int(),))  # [B, 2] flattened
    decisions = make_fake_compact_tensor(cutlass.Int32, (cute.sym_int(), cute.sym_int(), cute.sym_int()), stride_order=(2, 1, 0))
    factors = make_fake_compact_tensor(cutlass.Float32, (cute.sym_int(),))  # [B], or a 1-element stand-in
    stream = make_fake_stream(use_tvm_ffi_env_stream=True)
    compiled = cute.compile(
        op, q, kc, vc, bt, lens, out, o_part, lse_part, counts, decisions, factors, cutlass.Float32(1.0), cutlass.Float32(0.0),
        cutlass.Int32(1), cutlass.Int32(0), cutlass.Int32(1), cutlass.Int32(0), cutlass.Int32(1), stream,
        options="--enable-tvm-ffi",
    )
    _COMPILED[key] = compiled
    return compiled


def compile_blasst_combine(*, head_dim: int, dtype: torch.dtype, use_pdl: bool = True):
    """Compile (once per variant and target arch) the split merge; ``use_pdl``: launched
    as a programmatic dependent of the decode kernel (see ``BlasstCombine``). The kernel
    takes at most ``MAX_SPLITS`` splits (one LSE per thread); :func:`blasst_decode` checks
    that, a direct caller must.

    Arguments of the compiled function: ``o_part, lse_part, out, seq_lens, next_n,
    rule_min_tiles, rule_target_splits``; with ``rule_min_tiles > 0`` the row of token
    ``t`` merges only the splits of request ``t // next_n`` under that :class:`SplitRule`,
    with 0 every split of ``o_part``."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream, make_fake_tensor

    key = ("combine", head_dim, dtype, use_pdl, target_arch())
    if key in _COMPILED:
        return _COMPILED[key]
    _, combine_cls = _kernel_module()
    op = combine_cls(head_dim, _cute_dtype(dtype), use_pdl)
    tokens, hq, splits = cute.sym_int(), cute.sym_int(), cute.sym_int()
    o_part = make_fake_compact_tensor(cutlass.Float32, (splits, tokens, hq, head_dim), stride_order=(3, 2, 1, 0),
                                      assumed_align=16)
    lse_part = make_fake_compact_tensor(cutlass.Float32, (splits, tokens, hq), stride_order=(2, 1, 0))
    out = make_fake_tensor(_cute_dtype(dtype), (tokens, hq, head_dim), stride=(cute.sym_int(), cute.sym_int(), 1))
    lens = make_fake_compact_tensor(cutlass.Int32, (cute.sym_int(),))
    stream = make_fake_stream(use_tvm_ffi_env_stream=True)
    compiled = cute.compile(op, o_part, lse_part, out, lens, cutlass.Int32(1), cutlass.Int32(0), cutlass.Int32(1), stream,
                            options="--enable-tvm-ffi")
    _COMPILED[key] = compiled
    return compiled


def _check_static(head_dim, group, next_n, block_size, dtype):
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    if not 1 <= next_n <= MAX_NEXT_N:
        raise ValueError(f"next_n (query tokens per request) must be in [1, {MAX_NEXT_N}], got {next_n}")
    if group < 1:
        raise ValueError(f"the GQA group (num_q_heads / num_kv_heads) must be >= 1, got {group}")
    if block_size % KV_TILE:
        raise ValueError(f"block_size must be a multiple of {KV_TILE}, got {block_size}")


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
    short_tiles = -(-_tiles(max_seq_len) // (LONG_SPLIT_RATIO * long + short))
    if long < 2 or long + short > MAX_SPLITS or short_tiles < MIN_TILES_PER_SHORT_SPLIT:
        return SplitShape(splits_filling_waves(WAVES_LARGE_BATCH, warps, max_seq_len, sms, MIN_TILES_PER_SPLIT))
    return SplitShape(long + short, long, LONG_SPLIT_RATIO)


def splits_filling_waves(waves: int | None, warps_per_split: int, max_seq_len: int, sm_count: int,
                         min_tiles_per_split: int) -> int:
    """Splits whose warps fill ``waves`` whole waves of resident warps (rounded down;
    None: no wave limit), capped so no split of the longest request has fewer than
    ``min_tiles_per_split`` tiles, and at ``MAX_SPLITS``."""
    cap = min(-(-_tiles(max_seq_len) // min_tiles_per_split), MAX_SPLITS)
    if waves is None:
        return int(cap)
    return int(max(1, min(sm_count * RESIDENT_WARPS_PER_SM * waves // max(warps_per_split, 1), cap)))


def _tiles(seq_len: int) -> int:
    """KV tiles of a request of ``seq_len`` keys (at least one)."""
    return -(-max(seq_len, 1) // KV_TILE)


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
        grid_splits = rule.max_split_count(_tiles(longest))
    elif split_rule is not None:
        raise ValueError("give either split_rule or an explicit num_splits, not both")
    else:
        grid_splits = num_splits
    key = (
        _meta(q), _meta(k_cache), _meta(v_cache), _meta(block_table), _meta(seq_lens), _meta(out),
        None if workspace is None else (_meta(workspace[0]), _meta(workspace[1])), _meta(skip_counts), _meta(decisions),
        _meta(threshold_scale_factor) if factor_tensor else threshold_scale_factor is None, next_n, rule, grid_splits, long_splits, long_split_ratio, min_warps_per_sm,
        k_stages,
    )
    launch = _LAUNCHES.get(key)
    if launch is None:
        if len(_LAUNCHES) >= MAX_CACHED_SIGNATURES:  # eager batches of many shapes: start over, never grow unbounded
            _LAUNCHES.clear()
        launch = _validate(q, k_cache, v_cache, block_table, seq_lens, threshold_scale_factor, next_n, rule,
                           grid_splits, long_splits, long_split_ratio, out, workspace, skip_counts, decisions,
                           min_warps_per_sm, k_stages)
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
              k_stages) -> _Launch:
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
    _check_static(d, hq // hkv, next_n, block_size, q.dtype)
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
    decode = compile_blasst_decode(
        head_dim=d, group=hq // hkv, next_n=next_n, block_size=block_size, dtype=q.dtype,
        has_threshold=has_threshold, count_skips=count, record_decisions=record, final_output=final,
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
