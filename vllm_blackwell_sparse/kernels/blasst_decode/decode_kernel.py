"""The BLASST decode kernel (CuTe DSL): one warp per (KV head x row tile, request, split);
the design is in the package docstring."""

import math

import cutlass
import cutlass.cute as cute
from cutlass import Boolean, Float32, Int32, const_expr

from vllm_blackwell_sparse.kernels.blasst_decode.device_helpers import (
    NEG_INF, quad_max, quad_sum, rule_split_count, rule_split_tiles,
)
from vllm_blackwell_sparse.kernels.blasst_decode.limits import KV_TILE, Q_TILE_ROWS, TIMELINE_STAMPS


class BlasstDecode:
    """One warp per (KV head x 8-row tile, request, split); see the module docstring.

    Compile-time: head dim, GQA group size, query tokens per request, page size,
    dtype, whether a threshold is compiled in (and read per request from a tensor),
    whether skip counters are written,
    and whether the output is final (one split) or partial. ``timeline`` (benchmarks):
    instead of skip decisions, each CTA with work (inactive ones write nothing) writes
    ``TIMELINE_STAMPS`` int32 into ``mDecisions[req, head_tile, split * TIMELINE_STAMPS:]``:
    global timer (low 32 bits) when its split starts, SM id, SM clock at that start / once
    the first K tiles arrived / after the main loop / after the store, kept eligible tiles,
    global timer at exit.
    """

    def __init__(self, head_dim, group, next_n, block_size, dtype, has_threshold, count_skips, record_decisions,
                 final_output, min_warps_per_sm, k_stages, factor_per_request=False, timeline=False):
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
        self.timeline = timeline
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
        if const_expr(self.timeline):
            tl_gt0 = cute.arch.globaltimer_lo()
            tl_c0 = cute.arch.clock()
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
        if const_expr(self.timeline):
            cute.arch.cp_async_wait_group(self.k_stages - 1)
            tl_c1 = cute.arch.clock()
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
        if const_expr(self.timeline):
            tl_c2 = cute.arch.clock()
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
        if const_expr(self.timeline):
            tl_c3 = cute.arch.clock()
            tl_gt1 = cute.arch.globaltimer_lo()
            if lane == 0:
                base = split * TIMELINE_STAMPS
                mDecisions[req, head_tile, base] = Int32(tl_gt0)
                mDecisions[req, head_tile, base + 1] = Int32(cute.arch.smid())
                mDecisions[req, head_tile, base + 2] = Int32(tl_c0)
                mDecisions[req, head_tile, base + 3] = Int32(tl_c1)
                mDecisions[req, head_tile, base + 4] = Int32(tl_c2)
                mDecisions[req, head_tile, base + 5] = Int32(tl_c3)
                mDecisions[req, head_tile, base + 6] = n_eligible - n_skipped
                mDecisions[req, head_tile, base + 7] = Int32(tl_gt1)

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
                if const_expr(self.record_decisions and not self.timeline):
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
