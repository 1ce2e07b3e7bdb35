"""GVR (Guess-Verify-Refine) exact top-k for the DSA decode indexer, in CuTe DSL.

Two kernels, one interface (:func:`gvr_topk`), chosen per (rows, width) by
:func:`default_kernel`: one CTA per row (``GvrTopKSm90``, below), which streams the row
from memory in every pass, and a thread-block cluster of 2-8 CTAs per row
(``GvrTopKCluster``), which holds the row in registers (or partly in shared memory) and
agrees through distributed shared memory. Semantics are those of
``reference/topk.py``: an unordered set of ``k`` column indices per row (``-1``
padded when the row is shorter), values ordered ``NaN > +inf > ... > -inf`` with
``-0 == +0``, ties at the cutoff won by lower column indices.

Both work on the 32-bit *ordered key* of each value (unsigned integer order = value order):

1. **Guess** a key window ``[lo, lo + 256 << shift)`` from the keys at the hinted
   columns (the previous step's top-k): ``lo`` = their minimum, ``shift`` the
   smallest that covers their maximum. With ``k`` distinct valid hints at least ``k``
   keys are ``>= lo``, so the k-th largest key lies in the window. Without a valid
   hint the window is the whole key range (a radix pass).
2. **Verify** with one counting pass over the row: keys above the window are counted
   in registers; keys inside it go to per-warp 256-bin shared-memory histograms.
   The bins give ``count(key >= boundary)`` for 257 thresholds at once; the chosen
   threshold ``T`` is the highest bin boundary with ``count >= k``. If that count
   exceeds the candidate capacity the window narrows to that bin (``shift -= 8``)
   and the pass repeats; if no bin boundary crosses ``k`` (fewer than ``k`` keys at
   or above the window, or ``k`` above it: a misleading hint) it widens to the whole
   range. At most 5 passes; a good hint needs one.
3. **Collect** the survivors ``key >= T`` into shared memory. Each warp owns a
   contiguous segment of the row, so its survivor count is known from its own
   histogram: warp offsets are an exclusive scan of those counts and, inside a warp,
   lane offsets a shuffle scan. No ballots, no per-element atomics, and candidates
   land in column order (which makes the tie rule a "first come" rule).
4. **Refine** exactly in shared memory: radix-select the k-th largest key ``K*``
   among the survivors (only the ``shift`` low bits are unknown), then write every
   survivor above ``K*`` and the first ``k - count(> K*)`` equal to it. When the
   window has narrowed to single keys (``shift == 0``), ``K*`` is known and the row
   is emitted directly from global memory, so tie blocks larger than the capacity
   cost no shared memory.

Rows are read with 128-bit loads when they are 16-byte aligned (``vec_width`` 4).
Shared memory: 1 KiB of histogram per warp + 8 bytes per candidate (capacity ``3 k``).

The steps above are the one-CTA kernel's; the cluster kernel's differences are in its
class docstring. Where the time goes (H200): the one-CTA row passes are
instruction-bound, about 20 µs per pass over 128K columns. Counting ``key >= T_q`` for 8 hint quantiles in registers
instead of the histogram pass was exact but 12-28% slower (more instructions per column),
so the histogram pass stays; speed at small batches needs several CTAs per row (the
cluster kernel). The cluster kernel is instruction-bound too (one CTA of 16 warps per
SM at 32 columns per thread): what counts is instructions per key, and memory
instructions most. Its verify round sends every key through one unconditional
shared-memory atomic (a branch per key, with its reconvergence, cost more; removing it
gained 2-13%), into its bin, an "above the window" entry or a spare "below" entry: 7
instructions per key in the SASS. Its emit marks each lane's keys above the crossing bin
in a bit mask and then stores only the marked columns, in one run of output slots from
a single warp scan, instead of issuing a (predicated) store instruction per key. With
both, at 1 x 128K the count took 0.83 µs per CTA (was 1.23) and the emit's stores 1.75
(was 2.47; benchmarks/topk_timeline.py), and the call 12.6 µs (was 13.9).
Neither kernel synchronises with the host or allocates: both can be captured in a CUDA
graph.
"""

from __future__ import annotations


import torch

from vllm_blackwell_sparse.kernels import target_arch

DEFAULT_THREADS = 512  # per CTA (one CTA per row); at least BINS
BINS = 256
# The cluster kernel's warp histogram: the bins, then at ABOVE the keys above the window and at
# BELOW the keys below it (which nothing reads), padded to 16 bytes.
ABOVE = BINS
BELOW = BINS + 1
HIST_STRIDE = BINS + 4
CAP_FACTOR = 3
VEC_WIDTHS = (1, 4)  # columns per load; 4: 128-bit loads, for rows that are 16-byte aligned
# Loads each lane issues before using any of them, per load width: the row scans are
# latency-bound unless many independent loads are outstanding.
DEFAULT_LOADS_IN_FLIGHT = {1: 16, 4: 4}
SUPPORTED_K = (512, 1024, 2048)
MAX_COLS = 1 << 24  # column indices and counts stay far inside int32
# The cluster kernel: CTAs per row, threads per CTA, and the register shares (columns per
# thread) it is compiled for; 8 x 512 x 64 holds rows of up to 256K columns.
CLUSTER_CTAS = 8
CLUSTER_THREADS = 512
# Cluster sizes the kernel is built for. 16 is a non-portable size on Hopper (CuTe DSL
# allows it on every kernel it loads); the H200 co-schedules 16 CTAs of a cluster in one GPC.
CLUSTER_SIZES = (2, 4, 8, 16)
CLUSTER_THREAD_COUNTS = (256, 512)
CLUSTER_COLUMNS_PER_THREAD = (8, 16, 32, 48, 64)
# Of those, how many a thread may keep in shared memory instead (at most half).
CLUSTER_SMEM_COLUMNS_PER_THREAD = (0, 16, 32)
MAX_CLUSTER_ROWS = 65535  # rows are the cluster kernel's grid y, which CUDA caps there

_COMPILED: dict[tuple, object] = {}


def _kernel_module():
    """Build the CuTe-DSL kernel class lazily (the DSL is imported only when needed)."""
    import cutlass
    import cutlass.cute as cute
    from cutlass import Int32, Uint32, const_expr

    @cute.jit
    def ordered_key(bits):
        """fp32 bits (as Int32) -> Uint32 key whose unsigned order is the value order."""
        # select_ returns an untyped value: re-wrap as Uint32 so comparisons stay unsigned.
        u = Uint32(bits)
        mag = u & Uint32(0x7FFFFFFF)
        key = Uint32(cutlass.select_((u & Uint32(0x80000000)) != Uint32(0), ~u, u | Uint32(0x80000000)))
        key = Uint32(cutlass.select_(mag == Uint32(0), Uint32(0x80000000), key))  # -0 == +0
        return Uint32(cutlass.select_(mag > Uint32(0x7F800000), Uint32(0xFFFFFFFF), key))  # every NaN on top

    def load_keys(mBits, mChunks, row, base, lane, col_end, loads, width):
        """One lane's share of the warp's next ``32 * loads * width`` columns from
        ``base``: ``loads`` groups; group ``u`` is the ``width`` consecutive columns
        starting at ``base + (32 u + lane) * width`` (so the warp covers the group's
        columns in lane order). Returns per group the keys, whether each column is
        ``< col_end``, and the columns. Loads are clamped in bounds instead of branched
        around, so all of them are issued before the first is used. ``width`` 4 loads
        each group with one 128-bit access from ``mChunks`` (the row viewed as 4-column
        chunks; needs 16-byte aligned rows)."""
        keys, valid, cols = [], [], []
        for u in range(loads):
            first = base + (32 * u + lane) * width
            if const_expr(width == 1):
                raw = [mBits[row, cutlass.min(first, col_end - 1)]]
            else:
                frag = cute.make_rmem_tensor((width,), Int32)
                chunk = cutlass.min(first, col_end - 1) // width
                cute.autovec_copy(mChunks[None, chunk], frag)
                raw = [frag[i] for i in range(width)]
            cs = [first + i for i in range(width)]
            keys.append([ordered_key(r) for r in raw])
            valid.append([c < col_end for c in cs])
            cols.append(cs)
        return keys, valid, cols

    from cutlass._mlir.dialects import llvm, nvvm
    from cutlass.cutlass_dsl import T, dsl_user_op

    @dsl_user_op
    def _peer_address(smem_ptr, peer, *, loc=None, ip=None):
        """``smem_ptr``'s address in the shared memory of the cluster's CTA ``peer``."""
        return nvvm.mapa(
            llvm.PointerType.get(cute.AddressSpace.dsmem),
            smem_ptr.to_llvm_ptr(loc=loc, ip=ip),
            Int32(peer).ir_value(loc=loc, ip=ip),
            loc=loc,
            ip=ip,
        )

    @dsl_user_op
    def load_peer_i32(smem_ptr, peer, *, loc=None, ip=None):
        """Int32 at ``smem_ptr`` in CTA ``peer``'s shared memory (``ld.shared::cluster``).
        A plain LLVM load, so the compiler keeps it after the cluster barrier."""
        return Int32(llvm.load(T.i32(), _peer_address(smem_ptr, peer, loc=loc, ip=ip), loc=loc, ip=ip))

    @dsl_user_op
    def store_peer_i32(smem_ptr, peer, value, *, loc=None, ip=None):
        """Store an Int32 at ``smem_ptr`` in CTA ``peer``'s shared memory."""
        llvm.store(Int32(value).ir_value(loc=loc, ip=ip), _peer_address(smem_ptr, peer, loc=loc, ip=ip), loc=loc, ip=ip)

    @dsl_user_op
    def copy_16_bytes_async(smem_ptr, gmem_ptr, *, loc=None, ip=None):
        """Start copying 16 bytes from global to shared memory (``cp.async.cg``): the data
        goes to shared memory without passing through registers."""
        dst = llvm.ptrtoint(T.i32(), smem_ptr.to_llvm_ptr(loc=loc, ip=ip), loc=loc, ip=ip)
        src = llvm.ptrtoint(T.i64(), gmem_ptr.to_llvm_ptr(loc=loc, ip=ip), loc=loc, ip=ip)
        llvm.inline_asm(
            None, [dst, src], "cp.async.cg.shared.global [$0], [$1], 16;", "r,l",
            has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip,
        )

    @dsl_user_op
    def wait_async_copies(*, loc=None, ip=None):
        """Wait until this thread's ``copy_16_bytes_async`` copies have landed."""
        llvm.inline_asm(
            None, [], "cp.async.commit_group; cp.async.wait_group 0;", "",
            has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip,
        )

    @cute.jit
    def count_in_window(key, live, lo, shift, sHist, warp, above):
        """One key of a verify round: a live key inside the window [lo, lo + 256 << shift)
        adds one to its bin of this warp's histogram, one above it to ``above`` (returned)."""
        if live and key >= lo:
            b = (key - lo) >> Uint32(shift)
            if b >= Uint32(BINS):
                above += 1
            else:
                cute.arch.atomic_add(sHist.iterator + (Int32(b) + warp * BINS), Int32(1))
        return above

    @cute.jit
    def count_in_window_branch_free(key, floor, lo, shift, hist):
        """``count_in_window`` without a branch, for the cluster kernel: a key ``>= floor``
        (``lo``, or higher to leave out padding keys) adds one to its entry of this warp's
        histogram ``hist`` (a pointer): its bin inside the window, ``ABOVE`` above it,
        ``BELOW`` below it. Most keys are below the window, and there a branch per key
        (with its reconvergence) cost more than the atomic: 6-13% faster at 16-64 rows
        (benchmarks/results/topk_h200_gvr_branch_free.json); a predicated atomic compiles
        to the same branch (ptxas 13.0). The shared-memory atomic adds of 1 show in the SASS
        as ``ATOMS.POPC.INC``. The one-CTA kernel keeps the branch:
        this form needs more registers there, which cost it a resident CTA per SM and 0-6%
        at 64-128 rows."""
        b = cutlass.min((key - lo) >> Uint32(shift), Uint32(ABOVE))
        slot = cutlass.select_(key >= floor, Int32(b), Int32(BELOW))
        cute.arch.atomic_add(hist + slot, Int32(1))

    @cute.jit
    def window_over(lo, hi):
        """(start, shift) of the first 256-bin window over keys [lo, hi] (lo <= hi): the
        smallest shift whose bins cover it, the start aligned to 1 << shift, so that each
        bin is a range of keys that share their high bits (what the radix refine needs).
        No shift below bitlen(hi - lo) - 8 covers the range and that one plus one always
        does, so it is one of those two (closed form: a loop over shifts was a serial
        chain of up to 24 steps on every CTA's path)."""
        bitlen = Int32(32) - Int32(cute.arch.clz(hi - lo))
        shift = cutlass.max(bitlen - 8, Int32(0))
        if ((hi >> Uint32(shift)) - (lo >> Uint32(shift))) >= Uint32(BINS):
            shift += 1
        return (lo >> Uint32(shift)) << Uint32(shift), shift

    @cute.jit
    def next_window(best, small_enough, lo, shift, done, thr_bin):
        """After a verify round whose crossing bin is ``best`` (-1: none in the window):
        widen to the whole key range when the window missed the k-th key (a misleading
        hint); stop on ``best`` when its keys are ``small_enough`` to finish or the bins are
        single keys; else narrow the window to that bin. Returns (done, thr_bin, lo, shift)."""
        if best < 0:
            lo = Uint32(0)
            shift = Int32(24)
        elif small_enough or shift == 0:
            done = Int32(1)
            thr_bin = best
        else:
            lo = lo + (Uint32(best) << Uint32(shift))
            shift = cutlass.max(shift - 8, Int32(0))
        return done, thr_bin, lo, shift

    @cute.jit
    def warp_inclusive_scan(val, lane):
        for i in cutlass.range_constexpr(5):
            off = 1 << i
            other = cute.arch.shuffle_sync_up(val, offset=off, mask_and_clamp=0)
            if lane >= off:
                val += other
        return val

    class GvrTopKSm90:
        """One CTA per row; see the module docstring. Also compiles for sm_100a."""

        def __init__(self, k: int, has_hint: bool, use_row_slot: bool, threads: int, loads: int, vec_width: int):
            self.k = k
            self.threads = threads
            self.warps = threads // 32
            self.loads = loads
            self.width = vec_width  # columns per load: 1, or 4 (128-bit loads of aligned rows)
            self.step = 32 * loads * vec_width  # columns a warp loads per iteration
            self.cap = CAP_FACTOR * k
            self.has_hint = has_hint
            self.use_row_slot = use_row_slot

        @cute.jit
        def __call__(self, mBits, mLens, mHint, mRowSlot, mOut, stream):
            self.kernel(mBits, mLens, mHint, mRowSlot, mOut).launch(
                grid=[mOut.shape[0], 1, 1], block=[self.threads, 1, 1], stream=stream
            )

        # --- block-wide helpers (every thread must call them) -------------------------

        @cute.jit
        def block_sum(self, val, sRed, tidx):
            lane, warp = tidx % 32, tidx // 32
            v = cute.arch.warp_reduction_sum(val)
            cute.arch.barrier()
            if lane == 0:
                sRed[warp] = v
            cute.arch.barrier()
            total = Int32(0)
            for w in cutlass.range_constexpr(self.warps):
                total += sRed[w]
            return total

        @cute.jit
        def block_extreme_u32(self, val, sRedU, tidx, take_max: cutlass.Constexpr):
            """Block-wide max (take_max) or min of a Uint32."""
            pick = cutlass.max if const_expr(take_max) else cutlass.min
            lane, warp = tidx % 32, tidx // 32
            v = val
            for i in cutlass.range_constexpr(5):
                v = pick(v, cute.arch.shuffle_sync_bfly(v, offset=1 << i))
            cute.arch.barrier()
            if lane == 0:
                sRedU[warp] = v
            cute.arch.barrier()
            m = sRedU[0]
            for w in cutlass.range_constexpr(1, self.warps):
                m = pick(m, sRedU[w])
            return m

        @cute.jit
        def block_exclusive_scan(self, val, sRed, tidx):
            """(exclusive prefix of val over threads, block total)."""
            lane, warp = tidx % 32, tidx // 32
            inc = warp_inclusive_scan(val, lane)
            cute.arch.barrier()
            if lane == 31:
                sRed[warp] = inc
            cute.arch.barrier()
            base = Int32(0)
            total = Int32(0)
            for w in cutlass.range_constexpr(self.warps):
                s = sRed[w]
                if w < warp:
                    base += s
                total += s
            return base + inc - val, total

        @cute.jit
        def find_crossing_bin(self, sCounts, base_count, target, sRed, sPick, tidx):
            """Highest bin b with ``base_count + sum(sCounts[b:]) >= target`` (sCounts has
            BINS entries; 0-padded). Writes sPick[0] = b (-1 if none), sPick[1] = that
            count, sPick[2] = the count above bin b. All threads must call it."""
            if tidx == 0:
                sPick[0] = Int32(-1)
            # Thread t holds bin BINS-1-t: an inclusive scan over threads is a suffix sum over bins.
            v = Int32(0)
            if tidx < BINS:
                v = sCounts[BINS - 1 - tidx]
            excl, _ = self.block_exclusive_scan(v, sRed, tidx)
            at_or_above = base_count + excl + v
            above = base_count + excl
            if tidx < BINS:
                if at_or_above >= target and above < target:
                    sPick[0] = Int32(BINS - 1 - tidx)
                    sPick[1] = at_or_above
                    sPick[2] = above
            cute.arch.barrier()

        @cute.jit
        def zero_warp_histogram(self, sHist, warp, lane, entries: cutlass.Constexpr = BINS):
            """Start of a verify round: this warp's first ``entries`` histogram entries (its
            bins, and in the cluster kernel its count above the window) zeroed, then a CTA barrier."""
            for b in cutlass.range(lane, entries, 32):
                sHist[b, warp] = 0
            cute.arch.barrier()

        @cute.jit
        def publish_warp_above(self, above, sWarp, warp, lane):
            """End of a verify round's count: the warp's keys above the window into
            ``sWarp[warp]``, then a CTA barrier."""
            above_w = cute.arch.warp_reduction_sum(above)
            if lane == 0:
                sWarp[warp] = above_w
            cute.arch.barrier()

        @cute.jit
        def lower_warps_counts(self, first_bin, thr_bin, base, tie_base, above_w, sHist, sWarp, sWarpTie, warp, lane):
            """From the per-warp histograms of the deciding round: the keys of the lower
            warps in bins ``first_bin`` and up (plus those above the window, ``above_w``
            for this warp), and in bin ``thr_bin``, added to ``base`` / ``tie_base``.
            These are a warp's write offsets. Every thread of the CTA must call it."""
            mine = Int32(0)
            for b in cutlass.range(first_bin + lane, BINS, 32):
                mine += sHist[b, warp]
            mine = cute.arch.warp_reduction_sum(mine) + above_w
            ties_w = sHist[thr_bin, warp]
            cute.arch.barrier()
            if lane == 0:
                sWarp[warp] = mine
                sWarpTie[warp] = ties_w
            cute.arch.barrier()
            for w in cutlass.range_constexpr(self.warps):
                if w < warp:
                    base += sWarp[w]
                    tie_base += sWarpTie[w]
            return base, tie_base

        @cute.jit
        def refine_and_emit(
            self, mOut, row, sCandKey, sCandIdx, n_cand, thresh, shift, count_gt_bin, sSuffix, sRed, sPick, tidx,
            out_base,
        ):
            """Steps 4 and 5 over the ``n_cand`` candidates (``key >= thresh``, in column
            order) in ``sCandKey`` / ``sCandIdx``, of which ``count_gt_bin`` lie above
            thresh's bin: radix-select the k-th largest key K* (only the low ``shift`` bits
            are unknown), then write the candidates above K* and the first ties to row
            ``row`` of ``mOut`` from column ``out_base`` on (0 when the candidates are all
            the survivors; the cluster kernel passes only the bin and writes the rest
            itself). Every thread of the CTA must call it."""
            k = self.k
            # ---- 4. refine: radix-select K* among the low `shift` bits ----
            prefix = thresh
            need = k - count_gt_bin  # rank of K* inside the chosen bin
            s = shift
            while s > 0:
                d_shift = cutlass.max(s - 8, Int32(0))
                width = s - d_shift
                nb = Int32(1) << width
                for b in cutlass.range(tidx, BINS, self.threads):
                    sSuffix[b] = 0
                cute.arch.barrier()
                for i in cutlass.range(tidx, n_cand, self.threads):
                    key = sCandKey[i]
                    if (key >> Uint32(s)) == (prefix >> Uint32(s)):
                        d = Int32((key >> Uint32(d_shift)) & Uint32(nb - 1))
                        cute.arch.atomic_add(sSuffix.iterator + d, Int32(1))
                cute.arch.barrier()
                self.find_crossing_bin(sSuffix, Int32(0), need, sRed, sPick, tidx)
                prefix = prefix | (Uint32(sPick[0]) << Uint32(d_shift))
                need = need - sPick[2]  # rank inside the chosen digit
                s = d_shift
                cute.arch.barrier()
            kstar = prefix
            need_ties = need
            # ---- emit: survivors > K*, then the first need_ties equal to K* ----
            per = (n_cand + self.threads - 1) // self.threads
            i0 = tidx * per
            i1 = cutlass.min(i0 + per, n_cand)
            n_gt = Int32(0)
            n_eq = Int32(0)
            for i in cutlass.range(i0, i1):
                key = sCandKey[i]
                n_gt += Int32(key > kstar)
                n_eq += Int32(key == kstar)
            gt_base, total_gt = self.block_exclusive_scan(n_gt, sRed, tidx)
            eq_base, _ = self.block_exclusive_scan(n_eq, sRed, tidx)
            for i in cutlass.range(i0, i1):
                key = sCandKey[i]
                if key > kstar:
                    mOut[row, out_base + gt_base] = sCandIdx[i]
                    gt_base += 1
                elif key == kstar:
                    if eq_base < need_ties:
                        mOut[row, out_base + total_gt + eq_base] = sCandIdx[i]
                    eq_base += 1

        # --- the kernel -----------------------------------------------------------------

        @cute.kernel
        def kernel(self, mBits, mLens, mHint, mRowSlot, mOut):
            tidx, _, _ = cute.arch.thread_idx()
            row, _, _ = cute.arch.block_idx()
            lane, warp = tidx % 32, tidx // 32
            k = self.k
            cap = self.cap

            smem = cutlass.utils.SmemAllocator()
            sHist = smem.allocate_tensor(Int32, cute.make_layout((BINS, self.warps), stride=(1, BINS)), 16)
            sCandKey = smem.allocate_tensor(Uint32, cute.make_layout(cap), 16)
            sCandIdx = smem.allocate_tensor(Int32, cute.make_layout(cap), 16)
            sRed = smem.allocate_tensor(Int32, cute.make_layout(self.warps), 16)
            sRedU = smem.allocate_tensor(Uint32, cute.make_layout(self.warps), 16)
            sWarp = smem.allocate_tensor(Int32, cute.make_layout(self.warps), 16)  # per-warp counts / bases
            sWarpTie = smem.allocate_tensor(Int32, cute.make_layout(self.warps), 16)
            sSuffix = smem.allocate_tensor(Int32, cute.make_layout(BINS + 1), 16)  # count(key >= bin b)
            sPick = smem.allocate_tensor(Int32, cute.make_layout(4), 16)

            length = cutlass.min(mLens[row], mBits.shape[1])
            length = cutlass.max(length, Int32(0))
            mChunks = mBits  # unused by width-1 loads
            if const_expr(self.width > 1):
                mChunks = cute.zipped_divide(mBits[row, None], (self.width,))

            if length <= k:
                # Every valid column, then -1.
                for j in cutlass.range(tidx, k, self.threads):
                    mOut[row, j] = Int32(cutlass.select_(j < length, j, Int32(-1)))
            else:
                # ---- 1. guess: a key window from the hinted columns ----
                hmin = Uint32(0xFFFFFFFF)
                hmax = Uint32(0)
                nvalid = Int32(0)
                if const_expr(self.has_hint):
                    slot = row
                    if const_expr(self.use_row_slot):
                        slot = mRowSlot[row]
                    if slot >= 0 and slot < mHint.shape[0]:  # a slot outside the table is "no hint"
                        # ceil(k / threads) hinted columns per thread, all loads issued first.
                        per = -(-k // self.threads)
                        js = [tidx + u * self.threads for u in range(per)]
                        cols = [mHint[slot, cutlass.min(j, Int32(k - 1))] for j in js]
                        raw = [mBits[row, cutlass.max(cutlass.min(c, length - 1), Int32(0))] for c in cols]
                        for u in cutlass.range_constexpr(per):
                            if js[u] < k and cols[u] >= 0 and cols[u] < length:
                                key = ordered_key(raw[u])
                                hmin = cutlass.min(hmin, key)
                                hmax = cutlass.max(hmax, key)
                                nvalid += 1
                nvalid = self.block_sum(nvalid, sRed, tidx)
                lo = Uint32(0)
                shift = Int32(24)
                if nvalid > 0:
                    lo = self.block_extreme_u32(hmin, sRedU, tidx, False)
                    hi = self.block_extreme_u32(hmax, sRedU, tidx, True)
                    lo, shift = window_over(lo, hi)

                # Each warp owns columns [seg_lo, seg_hi): a multiple of 32 * width long.
                unit = 32 * self.width
                seg = ((length + self.warps * unit - 1) // (self.warps * unit)) * unit
                seg_lo = warp * seg
                seg_hi = cutlass.min(seg_lo + seg, length)

                # ---- 2. verify: histogram passes until k <= count(>= T) <= cap ----
                done = Int32(0)
                thr_bin = Int32(0)
                while done == 0:
                    self.zero_warp_histogram(sHist, warp, lane)
                    above = Int32(0)
                    for base in cutlass.range(seg_lo, seg_hi, self.step):
                        keys, valid, _ = load_keys(mBits, mChunks, row, base, lane, seg_hi, self.loads, self.width)
                        for u in cutlass.range_constexpr(self.loads):
                            for i in cutlass.range_constexpr(self.width):
                                above = count_in_window(keys[u][i], valid[u][i], lo, shift, sHist, warp, above)
                    self.publish_warp_above(above, sWarp, warp, lane)
                    # Bin totals and their suffix sums (thread b owns bin b), then pick
                    # the highest boundary with count >= k.
                    if tidx < BINS:
                        tot = Int32(0)
                        for w in cutlass.range_constexpr(self.warps):
                            tot += sHist[tidx, w]
                        sSuffix[tidx] = tot
                    above_all = Int32(0)
                    for w in cutlass.range_constexpr(self.warps):
                        above_all += sWarp[w]
                    cute.arch.barrier()
                    self.find_crossing_bin(sSuffix, above_all, k, sRed, sPick, tidx)
                    # Stop once every survivor fits in the candidate buffer.
                    done, thr_bin, lo, shift = next_window(sPick[0], sPick[1] <= cap, lo, shift, done, thr_bin)
                    cute.arch.barrier()

                thresh = lo + (Uint32(thr_bin) << Uint32(shift))
                count_ge = sPick[1]
                count_gt_bin = sPick[2]  # keys above the chosen bin
                # Survivors (and keys in the chosen bin) of the lower warps.
                base_w, tie_base_w = self.lower_warps_counts(
                    thr_bin, thr_bin, Int32(0), Int32(0), sWarp[warp], sHist, sWarp, sWarpTie, warp, lane
                )

                if shift == 0:
                    # ---- K* = thresh exactly: emit straight from the row ----
                    need_ties = k - count_gt_bin
                    out_gt = base_w - tie_base_w  # keys > K* before this warp
                    tie_rank = tie_base_w
                    for base in cutlass.range(seg_lo, seg_hi, self.step):
                        keys, valid, cols = load_keys(mBits, mChunks, row, base, lane, seg_hi, self.loads, self.width)
                        for u in cutlass.range_constexpr(self.loads):
                            # The lane's columns of group u are consecutive and lanes are in
                            # column order: a scan of per-lane counts gives column-ordered slots.
                            gt = [Int32(valid[u][i] and keys[u][i] > thresh) for i in range(self.width)]
                            eq = [Int32(valid[u][i] and keys[u][i] == thresh) for i in range(self.width)]
                            n_gt, n_eq = gt[0], eq[0]
                            for i in cutlass.range_constexpr(1, self.width):
                                n_gt += gt[i]
                                n_eq += eq[i]
                            inc_gt = warp_inclusive_scan(n_gt, lane)
                            inc_eq = warp_inclusive_scan(n_eq, lane)
                            o = out_gt + inc_gt - n_gt
                            r = tie_rank + inc_eq - n_eq
                            for i in cutlass.range_constexpr(self.width):
                                if gt[i] == 1:
                                    mOut[row, o] = cols[u][i]
                                if eq[i] == 1 and r < need_ties:
                                    mOut[row, count_gt_bin + r] = cols[u][i]
                                o += gt[i]
                                r += eq[i]
                            out_gt += cute.arch.shuffle_sync(inc_gt, 31)
                            tie_rank += cute.arch.shuffle_sync(inc_eq, 31)
                else:
                    # ---- 3. collect survivors (key >= thresh) in column order ----
                    pos = base_w
                    for base in cutlass.range(seg_lo, seg_hi, self.step):
                        keys, valid, cols = load_keys(mBits, mChunks, row, base, lane, seg_hi, self.loads, self.width)
                        for u in cutlass.range_constexpr(self.loads):
                            keep = [Int32(valid[u][i] and keys[u][i] >= thresh) for i in range(self.width)]
                            n_keep = keep[0]
                            for i in cutlass.range_constexpr(1, self.width):
                                n_keep += keep[i]
                            # Most groups hold no survivor: skip their scan.
                            if cute.arch.vote_any_sync(n_keep > 0):
                                inc = warp_inclusive_scan(n_keep, lane)
                                o = pos + inc - n_keep
                                for i in cutlass.range_constexpr(self.width):
                                    if keep[i] == 1:
                                        sCandKey[o] = keys[u][i]
                                        sCandIdx[o] = cols[u][i]
                                    o += keep[i]
                                pos += cute.arch.shuffle_sync(inc, 31)
                    cute.arch.barrier()
                    self.refine_and_emit(
                        mOut, row, sCandKey, sCandIdx, count_ge, thresh, shift, count_gt_bin, sSuffix, sRed, sPick, tidx,
                        Int32(0),
                    )

    class GvrTopKCluster(GvrTopKSm90):
        """A thread-block cluster of ``cluster`` CTAs per row; each CTA keeps its share of
        the row on chip (``per_thread`` columns per thread), so the verify rounds re-read
        nothing from memory: in registers, or the last ``smem_per_thread`` of each thread's
        columns in shared memory (copied there with ``cp.async``, read back with 128-bit
        loads), which frees registers so that more CTAs fit on an SM, and so more rows'
        clusters at once. The CTAs agree on every decision through distributed
        shared memory: each publishes its 256-bin histogram, a cluster barrier, then every
        CTA sums all of them and takes the same decision.

        It ends differently from the one-CTA kernel: once the bin holding the k-th key
        (the crossing bin) has at most ``cap`` keys, every CTA writes its keys above that
        bin straight to the output (offsets from prefix sums over CTAs, warps and lanes;
        lane-major inside a warp), and only the crossing bin's keys, in column order, go
        to the leader CTA's shared memory, where the radix refine picks the rest. With a good hint that bin holds a
        few hundred keys instead of the ~k survivors the one-CTA kernel refines."""

        def __init__(self, k, has_hint, use_row_slot, threads, cluster, per_thread, smem_per_thread=0):
            super().__init__(k, has_hint, use_row_slot, threads, per_thread // 4, 4)
            self.cluster = cluster
            self.groups = per_thread // 4  # 128-bit loads per lane
            # The last smem_per_thread of a thread's columns are kept in shared memory, the
            # rest in registers: fewer registers per thread, so that more CTAs fit per SM.
            self.smem_groups = smem_per_thread // 4
            self.reg_groups = self.groups - self.smem_groups
            # CTAs per SM to compile for (caps the registers) when part of the row is in
            # shared memory: as many as ~48 registers per thread besides the register columns allow.
            self.min_ctas_per_sm = max(1, 65536 // (threads * (4 * self.reg_groups + 48))) if smem_per_thread else 0
            self.capacity = cluster * threads * per_thread  # columns a row may have
            # The leader holds only the crossing bin's keys: at most k (a fuller bin is
            # narrowed by one more round), which keeps shared memory, and so occupancy, small.
            self.cap = k

        @cute.jit
        def __call__(self, mBits, mLens, mHint, mRowSlot, mOut, stream):
            self.kernel(mBits, mLens, mHint, mRowSlot, mOut).launch(
                grid=[self.cluster, mOut.shape[0], 1],
                block=[self.threads, 1, 1],
                cluster=[self.cluster, 1, 1],
                stream=stream,
                # With part of the row in shared memory, compile for min_ctas_per_sm CTAs per SM
                # (this caps the registers; the carveout is given so that compiling needs no GPU).
                min_blocks_per_mp=self.min_ctas_per_sm,
                preferred_smem_carveout=100 if const_expr(self.smem_groups > 0) else None,
            )

        @cute.jit
        def smem_keys(self, sKeys, tidx, gs):
            """The 4 keys of this thread's shared-memory group ``gs`` (one 128-bit load)."""
            frag = cute.make_rmem_tensor((4,), Uint32)
            cute.autovec_copy(sKeys[None, tidx, gs], frag)
            return [frag[i] for i in range(4)]

        @cute.jit
        def cluster_sync(self):
            # arrive has release and wait acquire semantics: shared-memory writes made
            # before the barrier are visible to every CTA of the cluster after it.
            cute.arch.cluster_arrive()
            cute.arch.cluster_wait()

        @cute.jit
        def block_hint_stats(self, nvalid, hmin, hmax, sRed2, sRedU2, tidx):
            """Block-wide (sum, min, max) of the hint statistics with one pair of barriers."""
            lane, warp = tidx % 32, tidx // 32
            n = cute.arch.warp_reduction_sum(nvalid)
            for i in cutlass.range_constexpr(5):
                hmin = cutlass.min(hmin, cute.arch.shuffle_sync_bfly(hmin, offset=1 << i))
                hmax = cutlass.max(hmax, cute.arch.shuffle_sync_bfly(hmax, offset=1 << i))
            cute.arch.barrier()
            if lane == 0:
                sRed2[warp, 0] = n
                sRedU2[warp, 0] = hmin
                sRedU2[warp, 1] = hmax
            cute.arch.barrier()
            n = sRed2[0, 0]
            lo = sRedU2[0, 0]
            hi = sRedU2[0, 1]
            for w in cutlass.range_constexpr(1, self.warps):
                n += sRed2[w, 0]
                lo = cutlass.min(lo, sRedU2[w, 0])
                hi = cutlass.max(hi, sRedU2[w, 1])
            return n, lo, hi

        @cute.kernel
        def kernel(self, mBits, mLens, mHint, mRowSlot, mOut):
            tidx, _, _ = cute.arch.thread_idx()
            _, row, _ = cute.arch.block_idx()
            rank = cute.arch.block_idx_in_cluster()
            lane, warp = tidx % 32, tidx // 32
            k = self.k
            cap = self.cap
            C = self.cluster

            smem = cutlass.utils.SmemAllocator()
            # Per-warp histograms with a spare bin each (count_in_window_branch_free).
            sHist = smem.allocate_tensor(Int32, cute.make_layout((HIST_STRIDE, self.warps), stride=(1, HIST_STRIDE)), 16)
            sCandKey = smem.allocate_tensor(Uint32, cute.make_layout(cap), 16)  # used in the leader only
            sCandIdx = smem.allocate_tensor(Int32, cute.make_layout(cap), 16)
            sRed = smem.allocate_tensor(Int32, cute.make_layout(self.warps), 16)
            sRed2 = smem.allocate_tensor(Int32, cute.make_layout((self.warps, 2), stride=(2, 1)), 16)
            sRedU2 = smem.allocate_tensor(Uint32, cute.make_layout((self.warps, 2), stride=(2, 1)), 16)
            sWarp = smem.allocate_tensor(Int32, cute.make_layout(self.warps), 16)
            sWarpTie = smem.allocate_tensor(Int32, cute.make_layout(self.warps), 16)
            sSuffix = smem.allocate_tensor(Int32, cute.make_layout(BINS + 1), 16)
            sPick = smem.allocate_tensor(Int32, cute.make_layout(4), 16)
            # Read by the other CTAs of the cluster: hint statistics (min key, max key,
            # valid count) and, double-buffered by round parity so that a round's writes
            # never race the previous round's remote reads, this CTA's histogram
            # (bins 0..255, then the count above the window at BINS).
            sStats = smem.allocate_tensor(Int32, cute.make_layout(4), 16)
            sShare = smem.allocate_tensor(Int32, cute.make_layout((BINS + 4, 2), stride=(1, BINS + 4)), 16)
            # Per entry of the shared histograms: the sum over the lower-ranked CTAs (this
            # CTA's write offsets, taken while the verify round reads every CTA's entry).
            sBefore = smem.allocate_tensor(Int32, cute.make_layout(BINS + 4), 16)
            # The shared-memory share of the row: group gs of thread t at [:, t, gs], so that a
            # warp's 128-bit loads of one group are contiguous.
            sKeys = None
            if const_expr(self.smem_groups > 0):
                sKeys = smem.allocate_tensor(
                    Uint32, cute.make_layout((4, self.threads, self.smem_groups), stride=(1, 4, 4 * self.threads)), 16
                )

            length = cutlass.min(mLens[row], mBits.shape[1])
            length = cutlass.max(length, Int32(0))
            mChunks = cute.zipped_divide(mBits[row, None], (4,))

            if length <= k:
                if rank == 0:
                    for j in cutlass.range(tidx, k, self.threads):
                        mOut[row, j] = Int32(cutlass.select_(j < length, j, Int32(-1)))
            else:
                # The hinted columns this CTA gathers (k / C of them), loaded first: the
                # gather of their values depends on them.
                share = k // C
                per = -(-share // self.threads)
                js = [tidx + u * self.threads for u in range(per)]
                hint_ok = False
                hint_cols = [Int32(-1) for _ in range(per)]
                if const_expr(self.has_hint):
                    slot = row
                    if const_expr(self.use_row_slot):
                        slot = mRowSlot[row]
                    hint_ok = slot >= 0 and slot < mHint.shape[0]  # a slot outside the table is "no hint"
                    safe_slot = cutlass.max(cutlass.min(slot, mHint.shape[0] - 1), Int32(0))
                    hint_cols = [mHint[safe_slot, cutlass.min(rank * share + j, Int32(k - 1))] for j in js]

                # This warp's columns [seg_lo, seg_hi): CTA r holds the r-th of C equal
                # parts, each split evenly over its warps in units of 128 columns.
                seg = ((length + C * self.warps * 128 - 1) // (C * self.warps * 128)) * 128
                seg_lo = (rank * self.warps + warp) * seg
                seg_hi = cutlass.min(seg_lo + seg, length)
                # ---- 0. the row into registers: group g of a lane holds the 4 columns
                # from seg_lo + (32 g + lane) * 4; columns past seg_hi get key 0, which no
                # value has (the smallest key, -inf's, is 0x007FFFFF). The shared-memory
                # groups are copied there directly, converted to keys below.
                frags = []
                for g in cutlass.range_constexpr(self.reg_groups):
                    frag = cute.make_rmem_tensor((4,), Int32)
                    first = seg_lo + (32 * g + lane) * 4
                    cute.autovec_copy(mChunks[None, cutlass.min(first, length - 1) // 4], frag)
                    frags.append(frag)
                for gs in cutlass.range_constexpr(self.smem_groups):
                    first = seg_lo + (32 * (self.reg_groups + gs) + lane) * 4
                    copy_16_bytes_async(
                        sKeys[None, tidx, gs].iterator, mChunks[None, cutlass.min(first, length - 1) // 4].iterator
                    )

                # ---- 1. guess: statistics of the hinted keys ----
                hmin = Uint32(0xFFFFFFFF)
                hmax = Uint32(0)
                nvalid = Int32(0)
                if const_expr(self.has_hint):
                    raw = [mBits[row, cutlass.max(cutlass.min(c, length - 1), Int32(0))] for c in hint_cols]
                    for u in cutlass.range_constexpr(per):
                        if hint_ok and js[u] < share and hint_cols[u] >= 0 and hint_cols[u] < length:
                            key = ordered_key(raw[u])
                            hmin = cutlass.min(hmin, key)
                            hmax = cutlass.max(hmax, key)
                            nvalid += 1
                keys = []
                for g in cutlass.range_constexpr(self.reg_groups):
                    first = seg_lo + (32 * g + lane) * 4
                    for i in cutlass.range_constexpr(4):
                        keys.append(Uint32(cutlass.select_(first + i < seg_hi, ordered_key(frags[g][i]), Uint32(0))))
                if const_expr(self.smem_groups > 0):
                    # Each thread converts only its own groups: no barrier needed.
                    wait_async_copies()
                    for gs in cutlass.range_constexpr(self.smem_groups):
                        first = seg_lo + (32 * (self.reg_groups + gs) + lane) * 4
                        frag = cute.make_rmem_tensor((4,), Uint32)
                        cute.autovec_copy(sKeys[None, tidx, gs], frag)
                        for i in cutlass.range_constexpr(4):
                            frag[i] = Uint32(cutlass.select_(first + i < seg_hi, ordered_key(frag[i]), Uint32(0)))
                        cute.autovec_copy(frag, sKeys[None, tidx, gs])
                nvalid, hmin, hmax = self.block_hint_stats(nvalid, hmin, hmax, sRed2, sRedU2, tidx)
                if tidx == 0:
                    sStats[0] = Int32(hmin)
                    sStats[1] = Int32(hmax)
                    sStats[2] = nvalid
                self.cluster_sync()
                lo = Uint32(0xFFFFFFFF)
                hi = Uint32(0)
                nvalid = Int32(0)
                for r in cutlass.range_constexpr(C):
                    lo = cutlass.min(lo, Uint32(load_peer_i32(sStats.iterator, r)))
                    hi = cutlass.max(hi, Uint32(load_peer_i32(sStats.iterator + 1, r)))
                    nvalid += load_peer_i32(sStats.iterator + 2, r)
                shift = Int32(24)
                if nvalid > 0:
                    lo, shift = window_over(lo, hi)
                else:
                    lo = Uint32(0)

                # ---- 2. verify: histogram rounds over the registers until the crossing
                # bin holds at most cap keys ----
                done = Int32(0)
                thr_bin = Int32(0)
                parity = Int32(0)
                hist = sHist.iterator + warp * HIST_STRIDE
                while done == 0:
                    self.zero_warp_histogram(sHist, warp, lane, ABOVE + 1)
                    floor = cutlass.max(lo, Uint32(1))  # padding columns hold key 0
                    for j in cutlass.range_constexpr(len(keys)):
                        count_in_window_branch_free(keys[j], floor, lo, shift, hist)
                    for gs in cutlass.range_constexpr(self.smem_groups):
                        for key in self.smem_keys(sKeys, tidx, gs):
                            count_in_window_branch_free(key, floor, lo, shift, hist)
                    cute.arch.barrier()
                    # Entries 0..BINS-1 are the bins, entry ABOVE (= BINS) the count above the window.
                    for e in cutlass.range(tidx, ABOVE + 1, self.threads):
                        tot = Int32(0)
                        for w in cutlass.range_constexpr(self.warps):
                            tot += sHist[e, w]
                        sShare[e, parity] = tot
                    self.cluster_sync()
                    for e in cutlass.range(tidx, ABOVE + 1, self.threads):
                        tot = Int32(0)
                        before = Int32(0)
                        for r in cutlass.range_constexpr(C):
                            v = load_peer_i32(sShare.iterator + (e + parity * (BINS + 4)), r)
                            tot += v
                            before += Int32(cutlass.select_(Int32(r) < rank, v, Int32(0)))
                        sSuffix[e] = tot
                        sBefore[e] = before
                    cute.arch.barrier()
                    self.find_crossing_bin(sSuffix, sSuffix[BINS], k, sRed, sPick, tidx)
                    # Stop once the crossing bin's keys fit in the leader's buffer.
                    in_bin = sPick[1] - sPick[2]
                    done, thr_bin, lo, shift = next_window(sPick[0], in_bin <= cap, lo, shift, done, thr_bin)
                    parity = 1 - parity
                    cute.arch.barrier()
                count_gt_bin = sPick[2]  # keys above the crossing bin: all of them are kept
                in_bin = sPick[1] - count_gt_bin
                need = k - count_gt_bin  # how many of the crossing bin's keys are kept

                # ---- 3. offsets: keys above the crossing bin and keys in it, of the
                # lower-ranked CTAs (summed per entry in the deciding round; every warp
                # adds them up itself, no barrier), then of this CTA's lower warps ----
                gt_before = Int32(0)
                for e in cutlass.range(thr_bin + 1 + lane, BINS + 1, 32):
                    gt_before += sBefore[e]
                gt_before = cute.arch.warp_reduction_sum(gt_before)
                gt_pos, bin_pos = self.lower_warps_counts(
                    thr_bin + 1, thr_bin, gt_before, sBefore[thr_bin], sHist[ABOVE, warp], sHist, sWarp, sWarpTie, warp,
                    lane,
                )

                # ---- 4. emit the keys above the crossing bin; the crossing bin's keys go
                # to the leader (or, when the bin is a single key, the first `need` of
                # them in column order are emitted here too) ----
                # The crossing bin is the key range [bin_first, bin_last] (aligned to
                # 1 << shift, so bin_last does not overflow); padding keys (0) are never in it.
                bin_first = lo + (Uint32(thr_bin) << Uint32(shift))
                bin_last = bin_first + ((Uint32(1) << Uint32(shift)) - Uint32(1))
                bin_first = Uint32(cutlass.max(bin_first, Uint32(1)))
                # Keys above the bin: any order is a valid set, so each lane marks its own in
                # a bit mask (bit j: keys[j]) and afterwards stores only the marked columns,
                # in one run of output slots from one warp scan of its count (lane-major,
                # deterministic). A predicated store per key issued a store instruction per
                # key, nearly all of them with no lane active. The bin's keys keep column
                # order (the tie rule: lower columns first), so they go per 4-column group,
                # which warps holding none of them in that group skip. Both in one pass over
                # the groups, so that each key's register is free after its group (64
                # columns per thread spilled when all keys stayed live until a second pass).
                # A key is in the bin when key - bin_first (unsigned, wrapping below it) is at
                # most bin_span: the group's smallest difference tells whether any is.
                bin_span = bin_last - bin_first
                gt_bits = [Uint32(0) for _ in range((4 * self.groups + 31) // 32)]
                for g in cutlass.range_constexpr(self.groups):
                    first = seg_lo + (32 * g + lane) * 4
                    group = keys[4 * g:4 * g + 4]
                    if const_expr(g >= self.reg_groups):
                        group = self.smem_keys(sKeys, tidx, g - self.reg_groups)
                    offs = []
                    for i in cutlass.range_constexpr(4):
                        j = 4 * g + i
                        gt_bits[j // 32] = gt_bits[j // 32] | (Uint32(group[i] > bin_last) << Uint32(j % 32))
                        offs.append(group[i] - bin_first)
                    nearest = cutlass.min(cutlass.min(offs[0], offs[1]), cutlass.min(offs[2], offs[3]))
                    if cute.arch.vote_any_sync(nearest <= bin_span):
                        inb = [Int32(offs[i] <= bin_span) for i in range(4)]
                        n_in = inb[0] + inb[1] + inb[2] + inb[3]
                        inc_in = warp_inclusive_scan(n_in, lane)
                        p = bin_pos + inc_in - n_in
                        for i in cutlass.range_constexpr(4):
                            if inb[i] == 1:
                                if shift == 0:
                                    if p < need:
                                        mOut[row, count_gt_bin + p] = first + i
                                else:
                                    store_peer_i32(sCandKey.iterator + p, 0, group[i])
                                    store_peer_i32(sCandIdx.iterator + p, 0, first + i)
                            p += inb[i]
                        bin_pos += cute.arch.shuffle_sync(inc_in, 31)
                n_gt = Int32(0)
                for w in cutlass.range_constexpr(len(gt_bits)):
                    n_gt += Int32(cute.arch.popc(gt_bits[w]))
                slot = gt_pos + warp_inclusive_scan(n_gt, lane) - n_gt
                for w in cutlass.range_constexpr(len(gt_bits)):
                    bits = gt_bits[w]
                    while bits != Uint32(0):
                        low = bits & (Uint32(0) - bits)
                        j = 32 * w + 31 - Int32(cute.arch.clz(low))  # the lowest marked key
                        # keys[j] is column seg_lo + (32 (j // 4) + lane) * 4 + j % 4
                        mOut[row, slot] = seg_lo + (32 * (j >> 2) + lane) * 4 + (j & 3)
                        slot += 1
                        bits = bits ^ low
                # Makes the leader's candidates visible to it, and keeps every CTA alive
                # until no other CTA reads its shared memory.
                self.cluster_sync()
                if shift != 0 and rank == 0:
                    self.refine_and_emit(
                        mOut, row, sCandKey, sCandIdx, in_bin, lo + (Uint32(thr_bin) << Uint32(shift)), shift,
                        count_gt_bin, sSuffix, sRed, sPick, tidx, count_gt_bin,
                    )

    return GvrTopKSm90, GvrTopKCluster


def compile_gvr_topk(
    k: int,
    *,
    has_hint: bool,
    use_row_slot: bool,
    threads: int = DEFAULT_THREADS,
    loads_in_flight: int | None = None,
    vec_width: int = 1,
):
    """Compile (once per variant and target arch) the kernel for ``k``.

    Compilation uses fake tensors with symbolic rows / columns / row stride, so one
    compiled kernel serves every shape and no GPU is needed to build it: the target is
    ``CUTE_DSL_ARCH`` when set (``sm_90a`` or ``sm_100a``), else the current GPU's.
    ``vec_width`` 4 compiles 128-bit row loads: the logits must then be 16-byte aligned
    with a column count and row stride divisible by 4 (:func:`gvr_topk` checks).
    """
    if k not in SUPPORTED_K:
        raise ValueError(f"k must be one of {SUPPORTED_K}, got {k}")
    if loads_in_flight is None:
        loads_in_flight = DEFAULT_LOADS_IN_FLIGHT.get(vec_width)
    if threads not in (256, 512, 1024) or loads_in_flight not in (2, 4, 8, 16, 32) or vec_width not in VEC_WIDTHS:
        raise ValueError(
            f"threads must be 256/512/1024, loads_in_flight 2/4/8/16/32 and vec_width one of {VEC_WIDTHS}, "
            f"got {threads}, {loads_in_flight}, {vec_width}"
        )
    key = (k, has_hint, use_row_slot, threads, loads_in_flight, vec_width, target_arch())
    if key in _COMPILED:
        return _COMPILED[key]
    one_cta_cls, _ = _kernel_module()
    op = one_cta_cls(k, has_hint, use_row_slot, threads, loads_in_flight, vec_width)
    compiled = _compile_with_fake_tensors(op, k, vec_width)
    _COMPILED[key] = compiled
    return compiled


def _compile_with_fake_tensors(op, k: int, vec_width: int):
    """cute.compile ``op`` on fake tensors with symbolic rows / columns / row stride / slots."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream, make_fake_tensor

    rows, slots = cute.sym_int(), cute.sym_int()
    cols, stride = cute.sym_int(divisibility=vec_width), cute.sym_int(divisibility=vec_width)
    bits = make_fake_tensor(cutlass.Int32, (rows, cols), stride=(stride, 1), assumed_align=4 * vec_width)
    lens = make_fake_compact_tensor(cutlass.Int32, (rows,))
    hint = make_fake_compact_tensor(cutlass.Int32, (slots, k), stride_order=(1, 0))
    row_slot = make_fake_compact_tensor(cutlass.Int32, (rows,))
    out = make_fake_compact_tensor(cutlass.Int32, (rows, k), stride_order=(1, 0))
    stream = make_fake_stream(use_tvm_ffi_env_stream=True)  # the caller's current torch stream
    return cute.compile(op, bits, lens, hint, row_slot, out, stream, options="--enable-tvm-ffi")


def cluster_columns_per_thread(cols: int, ctas_per_row: int = CLUSTER_CTAS, threads: int = CLUSTER_THREADS) -> int | None:
    """The register share per thread (columns) of the cluster kernel for rows of ``cols``
    columns: the smallest compiled size that holds the row, or None when none does."""
    for per_thread in CLUSTER_COLUMNS_PER_THREAD:
        if ctas_per_row * threads * per_thread >= cols:
            return per_thread
    return None


def compile_gvr_topk_cluster(
    k: int,
    *,
    has_hint: bool,
    use_row_slot: bool,
    per_thread: int,
    ctas_per_row: int = CLUSTER_CTAS,
    threads: int = CLUSTER_THREADS,
    smem_per_thread: int = 0,
):
    """Compile (once per variant and target arch) the cluster kernel: ``ctas_per_row`` CTAs
    of ``threads`` threads per row, ``per_thread`` columns per thread (rows of up to
    ``ctas_per_row * threads * per_thread`` columns, 16-byte aligned), of which
    ``smem_per_thread`` are kept in shared memory and the rest in registers."""
    if k not in SUPPORTED_K:
        raise ValueError(f"k must be one of {SUPPORTED_K}, got {k}")
    if ctas_per_row not in CLUSTER_SIZES or threads not in CLUSTER_THREAD_COUNTS or per_thread not in CLUSTER_COLUMNS_PER_THREAD:
        raise ValueError(
            f"ctas_per_row must be one of {CLUSTER_SIZES}, threads one of {CLUSTER_THREAD_COUNTS} and per_thread "
            f"one of {CLUSTER_COLUMNS_PER_THREAD}, "
            f"got {ctas_per_row}, {threads}, {per_thread}"
        )
    if smem_per_thread not in CLUSTER_SMEM_COLUMNS_PER_THREAD or 2 * smem_per_thread > per_thread:
        raise ValueError(
            f"smem_per_thread must be one of {CLUSTER_SMEM_COLUMNS_PER_THREAD} and at most half of per_thread "
            f"({per_thread}), got {smem_per_thread}"
        )
    key = ("cluster", k, has_hint, use_row_slot, per_thread, ctas_per_row, threads, smem_per_thread, target_arch())
    if key in _COMPILED:
        return _COMPILED[key]
    _, cluster_cls = _kernel_module()
    op = cluster_cls(k, has_hint, use_row_slot, threads, ctas_per_row, per_thread, smem_per_thread)
    compiled = _compile_with_fake_tensors(op, k, 4)
    _COMPILED[key] = compiled
    return compiled


def gvr_topk(
    logits: torch.Tensor,
    seq_lens: torch.Tensor,
    k: int,
    *,
    hint: torch.Tensor | None = None,
    hint_table: torch.Tensor | None = None,
    row_slot: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    threads: int | None = None,
    loads_in_flight: int | None = None,
    vec_width: int | None = None,
    ctas_per_row: int | None = None,
    smem_per_thread: int | None = None,
) -> torch.Tensor:
    """Exact top-k column indices of each fp32 logits row (semantics: ``reference/topk.py``).

    ``seq_lens``: (rows,) or (B, next_n) int32, one valid length per row. The hint is
    either ``hint`` ``[rows, k]`` (the previous step's indices of each row) or
    ``hint_table`` ``[slots, k]`` plus ``row_slot`` ``[rows]`` (-1: no hint for that
    row). Hints only change speed. ``out``: preallocated int32 ``[rows, k]``; with it
    the call allocates nothing and can be captured in a CUDA graph. ``workspace`` is
    accepted for interface compatibility and unused (all scratch is shared memory).
    Which kernel: ``ctas_per_row`` 1 runs one CTA per row (``threads`` 256/512/1024,
    ``loads_in_flight`` per lane and ``vec_width`` tune it; ``vec_width`` is the columns
    per load, 4 (128-bit loads, the default for 16-byte aligned rows, see
    :func:`rows_are_16b_aligned`) or 1). ``ctas_per_row`` 2, 4, 8 or 16 runs a thread-block
    cluster of that many CTAs (``threads`` 256 or 512 each) per row, holding the row in
    registers: it needs 16-byte aligned rows of at most ``ctas_per_row * threads * 64``
    columns; ``smem_per_thread`` (0, 16 or 32, at most half of the columns per thread) of
    each thread's columns go to shared memory instead, which frees registers for more CTAs
    per SM. None (the default) takes :func:`default_kernel`'s choice, or one CTA per row
    when ``loads_in_flight``, ``vec_width`` or ``threads`` is given alone. No choice
    changes the selected set (the order inside an output row may differ).
    """
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be a 2-D float32 tensor, got {tuple(logits.shape)} {logits.dtype}")
    if not logits.is_cuda:
        raise ValueError("logits must be on a CUDA device")
    if logits.stride(1) != 1:
        raise ValueError(f"logits must be contiguous along columns (stride(1) == 1), got stride {logits.stride()}")
    if k not in SUPPORTED_K:
        raise ValueError(f"k must be one of {SUPPORTED_K}, got {k}")
    rows, cols = logits.shape
    if cols >= MAX_COLS:
        raise ValueError(f"rows longer than {MAX_COLS} columns are not supported, got {cols}")
    lens = seq_lens.reshape(-1)
    if lens.numel() != rows or lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 with one length per row ({rows}), got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    if hint is not None and hint_table is not None:
        raise ValueError("pass either hint or hint_table/row_slot, not both")
    if hint_table is not None and row_slot is None:
        raise ValueError("hint_table needs row_slot ([rows] int32, -1 = no hint)")
    table = hint if hint is not None else hint_table
    if table is not None and (table.dtype != torch.int32 or table.dim() != 2 or table.shape[1] != k or not table.is_contiguous()):
        raise ValueError(f"hint / hint_table must be contiguous int32 [*, {k}], got {tuple(table.shape)} {table.dtype}")
    if hint is not None and hint.shape[0] != rows:
        raise ValueError(f"hint must have one row per logits row ({rows}), got {hint.shape[0]}")
    if row_slot is not None and (row_slot.dtype != torch.int32 or row_slot.numel() != rows):
        raise ValueError(f"row_slot must be int32 [rows={rows}]")
    if out is None:
        out = torch.empty(rows, k, dtype=torch.int32, device=logits.device)
    elif out.shape != (rows, k) or out.dtype != torch.int32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous int32 [{rows}, {k}]")
    if rows == 0:
        return out
    has_hint = table is not None
    use_row_slot = hint_table is not None
    aligned = rows_are_16b_aligned(logits)
    if ctas_per_row is None:
        # A tuning of the one-CTA kernel (any of its knobs given alone) asks for that kernel.
        if loads_in_flight is not None or vec_width is not None or threads is not None or smem_per_thread is not None:
            ctas_per_row = 1 if smem_per_thread is None else CLUSTER_CTAS
        else:
            ctas_per_row, threads, smem_per_thread = default_kernel(rows, cols, aligned)
    if ctas_per_row != 1:
        threads = threads or CLUSTER_THREADS
        smem_per_thread = smem_per_thread or 0
        per_thread = None
        if ctas_per_row in CLUSTER_SIZES and threads in CLUSTER_THREAD_COUNTS:
            per_thread = cluster_columns_per_thread(cols, ctas_per_row, threads)
        if per_thread is None or not aligned or rows > MAX_CLUSTER_ROWS:
            raise ValueError(
                f"ctas_per_row must be 1, or one of {CLUSTER_SIZES} (threads one of {CLUSTER_THREAD_COUNTS}) for at most "
                f"{MAX_CLUSTER_ROWS} 16-byte aligned "
                f"rows of at most ctas_per_row * threads * {CLUSTER_COLUMNS_PER_THREAD[-1]} columns; got "
                f"ctas_per_row={ctas_per_row}, threads={threads} for {rows} rows of {cols} columns "
                f"({'aligned' if aligned else 'not 16-byte aligned'})"
            )
        if loads_in_flight is not None or vec_width is not None:
            raise ValueError("loads_in_flight and vec_width tune the one-CTA kernel (ctas_per_row=1) only")
        fn = compile_gvr_topk_cluster(
            k, has_hint=has_hint, use_row_slot=use_row_slot, per_thread=per_thread, ctas_per_row=ctas_per_row,
            threads=threads, smem_per_thread=smem_per_thread,
        )
        fn(logits.view(torch.int32), lens, table if has_hint else out, row_slot if use_row_slot else lens, out)
        return out
    if smem_per_thread:
        raise ValueError("smem_per_thread tunes the cluster kernel (ctas_per_row > 1) only")
    if vec_width is None:
        vec_width = 4 if aligned else 1
    elif vec_width == 4 and not aligned:
        raise ValueError("vec_width=4 needs 16-byte aligned logits rows (data pointer, row stride and columns)")
    fn = compile_gvr_topk(
        k, has_hint=has_hint, use_row_slot=use_row_slot, threads=threads or DEFAULT_THREADS, loads_in_flight=loads_in_flight,
        vec_width=vec_width,
    )
    # Without a hint (or row_slot) the kernel never reads those arguments; pass
    # well-formed stand-ins (``out`` is an int32 [*, k] tensor, ``lens`` int32 [rows])
    # so one signature serves every variant and nothing is allocated.
    fn(
        logits.view(torch.int32),
        lens,
        table if has_hint else out,
        row_slot if use_row_slot else lens,
        out,
    )
    return out


def default_kernel(rows: int, cols: int, aligned: bool) -> tuple[int, int, int]:
    """(ctas_per_row, threads, smem_per_thread) that :func:`gvr_topk` runs by default for
    ``rows`` rows of ``cols`` columns: the fastest of the cluster variants (2/4/8 CTAs of
    256/512 threads, all columns in registers or part of them in shared memory) and the
    one-CTA kernel (1024 threads) in the H200 sweeps of docs/BENCHMARKS.md, per bucket of
    rows and width (``_DEFAULT_KERNELS`` says which sweep). Few rows want many CTAs per
    row; many rows want few, so that all of them are resident at once; at 128K columns,
    past 30 rows the rows' clusters no longer fit in the register files at once and half
    of each thread's columns go to shared memory; past 128 rows of 64K or 128K columns one
    CTA per row, which streams the row from L2, is kept (unmeasured there). Rows of
    128K-256K columns (unmeasured) take the earlier 128K rule (8 x 512 up to 32 rows).
    Unaligned rows and rows wider than 256K columns take one CTA per row, and so do more
    than 65535 rows (the cluster kernel puts rows on the grid's y axis)."""
    if not aligned or cluster_columns_per_thread(cols) is None or rows > MAX_CLUSTER_ROWS:
        return 1, DEFAULT_THREADS, 0
    rule = next(choice for most_rows, choice in _width_bucket(cols) if most_rows is None or rows <= most_rows)
    return _kernel_choice(cols, *rule)


def default_kernels_for_width(cols: int) -> tuple[tuple[int, int, int], ...]:
    """Every (ctas_per_row, threads, smem_per_thread) :func:`default_kernel` can pick for aligned rows of
    ``cols`` columns, whatever the number of rows (what to compile ahead of time)."""
    return tuple(dict.fromkeys(_kernel_choice(cols, *rule) for _, rule in _width_bucket(cols)))


def _kernel_choice(cols: int, ctas: int, threads: int, register_columns: int | None) -> tuple[int, int, int]:
    """(ctas_per_row, threads, smem_per_thread) of a rule: the columns per thread past
    ``register_columns`` (None: no limit) go to shared memory."""
    if ctas == 1 or register_columns is None:
        return ctas, threads, 0
    return ctas, threads, max(0, cluster_columns_per_thread(cols, ctas, threads) - register_columns)


# default_kernel's rule for aligned rows the cluster kernel holds: per width bucket (most
# columns, None = up to 256K), per rows bucket (most rows, None = any), (ctas_per_row, threads,
# the most columns per thread kept in registers, the rest in shared memory; None: all in registers).
# From the sweep of dfaacff (benchmarks/results/topk_h200_gvr_emit_sweep.json); 16-CTA
# clusters were at most 1.4% faster there (1 row of 128K) and are left out of the default:
# their size is non-portable. 64K past 64 rows and 128K past 30 rows from the sweep of the
# shared-memory share (topk_h200_gvr_smem_share_configs.json): with all 64 columns per thread
# in registers (128 registers, 2 CTAs per SM) the H200 held the 8-CTA clusters of 30 rows of
# 128K at once but not those of 32, which ran in two waves (25.3 µs against 17.8 at 30 rows,
# topk_h200_gvr_rows_sweep_128k.json); with 32 of them in shared memory (80 registers, 3 CTAs
# per SM) 32 rows took 21.5 µs, and 64-128 rows beat the one-CTA kernel (37.7 against 56.6
# µs at 64 rows). Past 128 rows (unmeasured) one CTA per row stays. Past 128K (unmeasured)
# the 128K rule of 7d838f0 stays, with 512 threads so that 8 CTAs hold 256K columns.
_DEFAULT_KERNELS = (
    (32768, ((8, (8, 256, None)), (32, (4, 256, None)), (64, (2, 512, None)), (None, (2, 256, None)))),
    (65536, ((32, (8, 256, None)), (128, (2, 512, None)), (None, (1, 1024, None)))),
    (131072, ((30, (8, 256, None)), (128, (8, 256, 32)), (None, (1, 1024, None)))),
    (None, ((32, (8, 512, None)), (None, (1, 1024, None)))),
)


def _width_bucket(cols: int):
    return next(rows_rule for most_cols, rows_rule in _DEFAULT_KERNELS if most_cols is None or cols <= most_cols)


def rows_are_16b_aligned(logits: torch.Tensor) -> bool:
    """Whether every row of ``logits`` can be read in 16-byte chunks (128-bit loads)."""
    return (
        logits.stride(1) == 1
        and logits.data_ptr() % 16 == 0
        and logits.stride(0) % 4 == 0
        and logits.shape[1] % 4 == 0
    )
