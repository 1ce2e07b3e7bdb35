"""Per-CTA phase timeline of the GVR cluster top-k kernel (H200): where a call's time goes.

It builds an instrumented copy of ``kernels/gvr_topk.py`` (``instrument.py``; the
committed kernel is not changed) whose cluster kernel reads the SM clock at its phase
boundaries and writes, from thread 0 of every CTA, ``STAMPS`` int32 into columns
``k + rank * STAMPS ...`` of a widened output (``[rows, k + 16 * STAMPS]``; the top-k
itself stays in the first ``k`` columns and is checked against torch.topk):

* ``gt_entry`` / ``gt_exit``: the global nanosecond timer at entry and exit;
* the SM clock at entry, after the hint statistics' cluster barrier (``stats``), after
  the last verify round (``verify``), after the emit offsets (``offsets``), after the
  emit and its cluster barrier (``emit``), and at exit (``refine``: the leader's exact
  refine of the crossing bin; other CTAs skip it);
* the verify rounds taken, the final window shift and the crossing bin's key count;
* the last verify round's parts: its count over the keys, its cluster barrier, its sum
  over the CTAs' histograms, its crossing-bin pick; the emit's stores and its barrier.

Per cell (``workloads.dsa_decode_trace``, middle-layer preset, true hint = the previous
step's top-k, k = 2048; the default kernel choice for the shape unless ``--ctas`` /
``--threads`` are given) it reports the span (first entry to last exit), the medians
(and maxima) of each phase in µs, the rounds, how the CTAs sat on the SMs (SMs used, the
most CTAs at once on one SM), and for reference the GPU time of the uninstrumented call,
of the instrumented one and of vLLM's choice (``bench.topk.time_kernel``, hot L2).
``--launch`` adds keyword arguments to the instrumented kernel's launch (an occupancy
experiment, e.g. ``preferred_smem_carveout=100``); ``--source`` instruments another copy
of ``gvr_topk.py`` (a variant under test) instead of the installed one.

    cd benchmarks && python topk_timeline.py --out $OUT/topk_timeline.json --cells 1x131072 32x65536 64x131072
"""

import argparse
import json

import numpy as np
import torch

from instrument import instrumented_copy, unwrap_globaltimer
from topk_variants import trace_cell
from vllm_blackwell_sparse.bench.topk import environment, inexact_reason, time_kernel, topk_kernels
from vllm_blackwell_sparse.kernels import gvr_topk as gt
from vllm_blackwell_sparse.workloads import DSA_TRACE_PRESETS, DsaTraceParams, topk_overlap

# gt_entry, smid, clk entry/stats/verify/offsets/emit/refine, rounds, shift, in_bin, gt_exit, then the last verify
# round's clock at its start, after its count (with the warps' barrier), after its cluster barrier, after its sum
# over the CTAs; the clock at the end of the emit's own stores (before its cluster barrier).
STAMPS = 17
PHASES = ("stats", "verify", "offsets", "emit", "refine")  # clock columns 3..7, each from the previous one
# The last verify round split at clock columns 12..15 and 4 (the end of the verify phase): its count over the keys
# (with the warps' barrier), the cluster barrier, the sum over the CTAs, the crossing bin and next window.
VERIFY_PARTS = ("count", "cluster_barrier", "sum", "pick")
CELLS = ["1x65536", "1x131072", "8x131072", "32x65536", "32x131072", "64x131072"]
K = 2048

_EDITS = [
    ("_COMPILED: dict[tuple, object] = {}\n", f"_COMPILED: dict[tuple, object] = {{}}\nTL_STAMPS = {STAMPS}\n"),
    ("            rank = cute.arch.block_idx_in_cluster()\n",
     "            rank = cute.arch.block_idx_in_cluster()\n"
     "            tl_gt0 = cute.arch.globaltimer_lo()\n            tl_c0 = cute.arch.clock()\n"),
    ("                self.cluster_sync()\n                lo = Uint32(0xFFFFFFFF)\n",
     "                self.cluster_sync()\n                tl_c1 = cute.arch.clock()\n                lo = Uint32(0xFFFFFFFF)\n"),
    ("                parity = Int32(0)\n                hist = sHist.iterator + warp * HIST_STRIDE\n",
     "                parity = Int32(0)\n                tl_rounds = Int32(0)\n"
     "                tl_v0 = cute.arch.clock()\n                tl_v1 = tl_v0\n                tl_v2 = tl_v0\n"
     "                tl_v3 = tl_v0\n"
     "                hist = sHist.iterator + warp * HIST_STRIDE\n"),
    ("                hist = sHist.iterator + warp * HIST_STRIDE\n                while done == 0:\n",
     "                hist = sHist.iterator + warp * HIST_STRIDE\n                while done == 0:\n"
     "                    tl_v0 = cute.arch.clock()\n"),
    ("                    cute.arch.barrier()\n                    # Entries 0..BINS-1",
     "                    cute.arch.barrier()\n                    tl_v1 = cute.arch.clock()\n"
     "                    # Entries 0..BINS-1"),
    ("                    self.cluster_sync()\n                    for e in cutlass.range(tidx, ABOVE + 1, self.threads):\n",
     "                    self.cluster_sync()\n                    tl_v2 = cute.arch.clock()\n"
     "                    for e in cutlass.range(tidx, ABOVE + 1, self.threads):\n"),
    ("                    cute.arch.barrier()\n                    self.find_crossing_bin(sSuffix, sSuffix[BINS], k",
     "                    cute.arch.barrier()\n                    tl_v3 = cute.arch.clock()\n"
     "                    self.find_crossing_bin(sSuffix, sSuffix[BINS], k"),
    ("                    parity = 1 - parity\n                    cute.arch.barrier()\n                count_gt_bin = ",
     "                    parity = 1 - parity\n                    tl_rounds += 1\n                    cute.arch.barrier()\n"
     "                tl_c2 = cute.arch.clock()\n                count_gt_bin = "),
    ("                # ---- 4. emit the keys above the crossing bin;",
     "                tl_c3 = cute.arch.clock()\n                # ---- 4. emit the keys above the crossing bin;"),
    ("                self.cluster_sync()\n                if shift != 0 and rank == 0:\n",
     "                self.cluster_sync()\n                tl_c4 = cute.arch.clock()\n"
     "                if shift != 0 and rank == 0:\n"),
    ("                        count_gt_bin, sSuffix, sRed, sPick, tidx, count_gt_bin,\n                    )\n",
     "                        count_gt_bin, sSuffix, sRed, sPick, tidx, count_gt_bin,\n                    )\n"
     "                tl_c5 = cute.arch.clock()\n"
     "                tl_gt1 = cute.arch.globaltimer_lo()\n"
     "                if tidx == 0:\n"
     "                    tl = k + rank * TL_STAMPS\n"
     "                    mOut[row, tl] = Int32(tl_gt0)\n"
     "                    mOut[row, tl + 1] = Int32(cute.arch.smid())\n"
     "                    mOut[row, tl + 2] = Int32(tl_c0)\n"
     "                    mOut[row, tl + 3] = Int32(tl_c1)\n"
     "                    mOut[row, tl + 4] = Int32(tl_c2)\n"
     "                    mOut[row, tl + 5] = Int32(tl_c3)\n"
     "                    mOut[row, tl + 6] = Int32(tl_c4)\n"
     "                    mOut[row, tl + 7] = Int32(tl_c5)\n"
     "                    mOut[row, tl + 8] = tl_rounds\n"
     "                    mOut[row, tl + 9] = shift\n"
     "                    mOut[row, tl + 10] = in_bin\n"
     "                    mOut[row, tl + 11] = Int32(tl_gt1)\n"
     "                    mOut[row, tl + 12] = Int32(tl_v0)\n"
     "                    mOut[row, tl + 13] = Int32(tl_v1)\n"
     "                    mOut[row, tl + 14] = Int32(tl_v2)\n"
     "                    mOut[row, tl + 15] = Int32(tl_v3)\n"
     "                    mOut[row, tl + 16] = Int32(tl_e1)\n"),
    ("                # Makes the leader's candidates visible to it, and keeps every CTA alive\n",
     "                tl_e1 = cute.arch.clock()\n"
     "                # Makes the leader's candidates visible to it, and keeps every CTA alive\n"),
    # The output is widened for the stamps of up to 16 CTAs per row.
    ("    out = make_fake_compact_tensor(cutlass.Int32, (rows, k), stride_order=(1, 0))\n",
     "    out = make_fake_compact_tensor(cutlass.Int32, (rows, k + 16 * TL_STAMPS), stride_order=(1, 0))\n"),
]


def instrumented_module(launch: str | None = None, source: str | None = None):
    edits = _EDITS + ([launch_edit(launch)] if launch else [])
    return instrumented_copy(source or gt.__file__, edits, "gvr_topk_timeline")


def summarize(stamps: np.ndarray) -> dict:
    """Summary of one call's stamps (``[CTAs, STAMPS]`` int64, see the module docstring)."""
    u32 = 1 << 32
    gt0, gt1 = unwrap_globaltimer(stamps[:, 0], stamps[:, 11])
    start, end = (gt0 - gt0.min()) / 1e3, (gt1 - gt0.min()) / 1e3  # µs from the first entry
    dur = end - start
    clk = [stamps[:, i] % u32 for i in range(2, 8)]
    cycles = (clk[-1] - clk[0]) % u32
    ghz = float(np.median(cycles / np.maximum(dur * 1e3, 1.0)))
    out = {"ctas": int(len(dur)), "sm_clock_ghz": ghz, "span_us": float(end.max()),
           "entry_spread_us": float(start.max()), "cta_us_median": float(np.median(dur)), "cta_us_max": float(dur.max())}
    for i, name in enumerate(PHASES):
        us = (clk[i + 1] - clk[i]) % u32 / (ghz * 1e3)
        out[f"{name}_us_median"] = float(np.median(us))
        out[f"{name}_us_max"] = float(us.max())
    verify = [stamps[:, i] % u32 for i in range(12, 16)] + [clk[2]]
    for i, name in enumerate(VERIFY_PARTS):
        out[f"verify_{name}_us_median"] = float(np.median((verify[i + 1] - verify[i]) % u32 / (ghz * 1e3)))
    out["emit_stores_us_median"] = float(np.median((stamps[:, 16] % u32 - clk[3]) % u32 / (ghz * 1e3)))
    out["emit_barrier_us_median"] = float(np.median((clk[4] - stamps[:, 16] % u32) % u32 / (ghz * 1e3)))
    out.update(residency(stamps[:, 1], start, end))
    rounds = stamps[:, 8]
    out["rounds"] = {str(int(r)): int(c) for r, c in zip(*np.unique(rounds, return_counts=True))}
    out["final_shift"] = {str(int(s)): int(c) for s, c in zip(*np.unique(stamps[:, 9], return_counts=True))}
    out["crossing_bin_keys_median"] = float(np.median(stamps[:, 10]))
    return out


def residency(smid: np.ndarray, start: np.ndarray, end: np.ndarray) -> dict:
    """How the CTAs sat on the SMs: how many SMs ran one, and the most that ran at
    once on one SM (2 or more: co-resident CTAs; 1 with more CTAs than SMs: waves)."""
    most = 0
    for sm in np.unique(smid):
        on = np.flatnonzero(smid == sm)
        events = sorted([(start[i], 1) for i in on] + [(end[i], -1) for i in on], key=lambda e: (e[0], e[1]))
        running = 0
        for _, step in events:
            running += step
            most = max(most, running)
    return {"sms_used": int(len(np.unique(smid))), "max_ctas_per_sm_at_once": int(most)}


def launch_edit(extra: str) -> tuple[str, str]:
    """An edit adding keyword arguments (``extra``, e.g. ``preferred_smem_carveout=100``)
    to the cluster kernel's launch."""
    anchor = "                cluster=[self.cluster, 1, 1],\n                stream=stream,\n"
    return anchor, anchor + f"                {extra},\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cells", nargs="+", default=CELLS, help="ROWSxWIDTH")
    ap.add_argument("--ctas", type=int, default=None, help="CTAs per row (default: gvr_topk.default_kernel's)")
    ap.add_argument("--threads", type=int, default=None, help="threads per CTA (default: the default kernel's)")
    ap.add_argument("--launch", default=None,
                    help="extra keyword arguments of the cluster kernel's launch, e.g. preferred_smem_carveout=100")
    ap.add_argument("--source", default=None, help="a gvr_topk.py copy to instrument instead of the installed one")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    a = ap.parse_args()
    tl = instrumented_module(a.launch, a.source)
    params = DsaTraceParams(query_drift=DSA_TRACE_PRESETS["middle_layers"])
    res = {"environment": environment(), "args": vars(a), "trace": params.__dict__, "cells": []}
    for cell in a.cells:
        rows, n = (int(v) for v in cell.split("x"))
        ctas, threads = gt.default_kernel(rows, n, True)
        ctas, threads = a.ctas or ctas, a.threads or threads
        if ctas == 1:
            print(f"{cell}: the default kernel is the one-CTA kernel (not instrumented); give --ctas", flush=True)
            continue
        per_thread = gt.cluster_columns_per_thread(n, ctas, threads)
        src, lens, hint, top, want = trace_cell(rows, n, K, params)
        fn = tl.compile_gvr_topk_cluster(K, has_hint=True, use_row_slot=False, per_thread=per_thread,
                                         ctas_per_row=ctas, threads=threads)
        wide = torch.full((rows, K + 16 * STAMPS), -1, dtype=torch.int32, device="cuda")
        for _ in range(5):  # the last call's stamps are kept
            fn(src.view(torch.int32), lens.view(-1), hint, lens.view(-1), wide)
        torch.cuda.synchronize()
        why = inexact_reason(src, wide[:, :K].contiguous(), K, want)
        stamps = wide[:, K:K + ctas * STAMPS].reshape(rows * ctas, STAMPS).cpu().numpy().astype(np.int64)
        out = torch.empty(rows, K, dtype=torch.int32, device="cuda")
        x = torch.empty_like(src)
        ours = time_kernel(lambda xx, ln, o: gt.gvr_topk(xx, ln, K, hint=hint, out=o, ctas_per_row=ctas, threads=threads),
                           x, src, lens, out, l2="hot", iters=a.iters, warmup=a.warmup)
        # The instrumented kernel itself (with --launch's arguments, which the plain call has not).
        instrumented = time_kernel(lambda xx, ln, o: fn(xx.view(torch.int32), ln.view(-1), hint, ln.view(-1), wide),
                                   x, src, lens, out, l2="hot", iters=a.iters, warmup=a.warmup)
        vllm = time_kernel(topk_kernels(rows, K)["vllm_choice"], x, src, lens, out, l2="hot", iters=a.iters,
                           warmup=a.warmup)
        run = {"rows": rows, "n": n, "ctas_per_row": ctas, "threads": threads, "per_thread": per_thread,
               "overlap": topk_overlap(hint.long(), top.indices), "instrumented_exact": why is None,
               "gvr_us": ours, "instrumented_us": instrumented, "vllm_choice_us": vllm, **summarize(stamps)}
        res["cells"].append(run)
        phases = ", ".join(f"{p} {run[f'{p}_us_median']:.2f}" for p in PHASES)
        parts = ", ".join(f"{p} {run[f'verify_{p}_us_median']:.2f}" for p in VERIFY_PARTS)
        print(f"{cell} C{ctas}x{threads} ({per_thread}/thread): gvr {ours:.1f} us, instrumented {instrumented:.1f}, "
              f"vLLM {vllm:.1f} us; timeline span {run['span_us']:.1f}, entry spread {run['entry_spread_us']:.1f}, "
              f"CTA median {run['cta_us_median']:.1f}, {run['sms_used']} SMs, at most {run['max_ctas_per_sm_at_once']} "
              f"CTAs per SM at once; phases (median us) {phases}; last verify round {parts}; emit stores "
              f"{run['emit_stores_us_median']:.2f}, emit barrier {run['emit_barrier_us_median']:.2f}; rounds {run['rounds']}; "
              f"exact {why is None}", flush=True)
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
