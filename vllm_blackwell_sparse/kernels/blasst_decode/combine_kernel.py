"""The split merge of the BLASST decode kernel (CuTe DSL)."""

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from vllm_blackwell_sparse.kernels.blasst_decode.device_helpers import NEG_INF, rule_split_count, rule_split_tiles
from vllm_blackwell_sparse.kernels.blasst_decode.limits import COMBINE_LOADS, COMBINE_THREADS, MAX_SPLITS


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
