"""Per-CTA timeline of the BLASST decode kernel (H200): how much of a call is the warps'
work and how much is waiting for the slowest CTAs of the last wave.

It runs the kernel's timeline variant (``blasst_decode(..., decisions=stamps,
timeline=True)``: compiled with timer reads, written through the ``decisions`` output
instead of skip decisions; the kernel source is not touched). For every CTA that has
work (one warp: one split of one (request, KV head)) it records the SM, the global
nanosecond timer when its split starts and at exit, the SM clock at the start / once the
first K tiles have arrived / after the main loop / after the store, and the number of
kept eligible tiles (a split's first tile, always kept, is not eligible and not counted). Per
cell (``workloads.peaked_decode_batch``, d 128, bf16; dense and at a factor calibrated
to ``--sparsity``) it reports:

* ``span_us``: first entry to last exit;
* ``work_us``: the CTAs' summed durations over the resident warp slots (8 per SM) --
  the span with no idle slot; ``busy`` = work / span;
* ``tail_us``: from the last moment 90% of the slots were busy to the end;
* medians of the prologue (entry to first K tile), loop and epilogue, in µs;
* a least-squares fit of CTA duration = a + b * kept eligible tiles.

    python benchmarks/decode_timeline.py --out $OUT/decode_timeline.json --cells 8x32768x32x16 --splits 16 49
"""

import argparse
import json
import sys

import numpy as np
import torch

from decode_variants import cell_inputs
from instrument import unwrap_globaltimer
from vllm_blackwell_sparse.bench.decode import calibrate_factors
from vllm_blackwell_sparse.bench.topk import environment
from vllm_blackwell_sparse.kernels import blasst_decode as bd

STAMPS = bd.TIMELINE_STAMPS  # int32 per CTA: gt_entry, smid, clk_entry, clk_first_k, clk_loop_end, clk_stored, kept, gt_exit
RESIDENT_SLOTS_PER_SM = bd.RESIDENT_WARPS_PER_SM

def summarize(stamps: np.ndarray, slots: int) -> dict:
    """Summary of one timeline (``[CTAs, STAMPS]`` int64, see the module docstring)."""
    u32 = 1 << 32
    gt0, gt1 = unwrap_globaltimer(stamps[:, 0], stamps[:, 7])
    start, end = (gt0 - gt0.min()) / 1e3, (gt1 - gt0.min()) / 1e3  # µs from the first entry
    dur = end - start
    clk = [stamps[:, i] % u32 for i in (2, 3, 4, 5)]
    cycles = (clk[3] - clk[0]) % u32
    long = dur > 5
    ghz = float(np.median(cycles[long] / (dur[long] * 1e3))) if long.any() else float("nan")

    def phase(a, b):
        return (clk[b] - clk[a]) % u32 / (ghz * 1e3)

    span = float(end.max())
    work = float(dur.sum() / slots)
    grid = np.linspace(0, span, 500)
    live = np.array([np.count_nonzero((start <= x) & (end > x)) for x in grid])
    full = min(slots, len(dur))
    busy_until = grid[live >= 0.9 * full]
    kept = stamps[:, 6].astype(float)
    fit = np.linalg.lstsq(np.vstack([np.ones_like(kept), kept]).T, dur, rcond=None)[0] if kept.any() else [dur.mean(), 0.0]
    return {
        "ctas": int(len(dur)), "sm_clock_ghz": ghz, "span_us": span, "work_us": work, "busy": work / span,
        "tail_us": float(span - busy_until.max()) if len(busy_until) else span,
        "prologue_us_median": float(np.median(phase(0, 1))), "loop_us_median": float(np.median(phase(1, 2))),
        "loop_us_min": float(phase(1, 2).min()), "loop_us_max": float(phase(1, 2).max()),
        "epilogue_us_median": float(np.median(phase(2, 3))),
        "kept_tiles_median": float(np.median(kept)), "kept_tiles_max": int(kept.max()),
        "duration_fit_us": {"per_cta": float(fit[0]), "per_kept_tile": float(fit[1])},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cells", nargs="+", default=["8x32768x32x16"], help="BATCHxCONTEXTxHQxPAGE")
    ap.add_argument("--splits", type=int, nargs="*", default=[],
                    help="equal-split counts to run besides the heuristic's split shape")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--raw", action="store_true", help="also write every CTA's stamps")
    a = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    hkv, d = 8, 128
    res = {"environment": environment(), "args": vars(a), "runs": []}
    for cell in a.cells:
        batch, ctx, hq, page = (int(x) for x in cell.split("x"))
        w, q, kc, vc, table, lens, scale, heuristic, heuristic_ws, counts = cell_inputs(batch, ctx, hq, page, hkv, d)
        for shape in dict.fromkeys([heuristic, *(bd.SplitShape(s) for s in a.splits)]):
            splits = shape.num_splits
            ws = heuristic_ws if shape == heuristic else bd.decode_workspace(splits, batch, hq, d, q.device)

            def call(factor, **kw):
                return bd.blasst_decode(q, kc, vc, table, lens, softmax_scale=scale, threshold_scale_factor=factor,
                                         workspace=ws, **shape._asdict(), **kw)

            def counting(factor):
                counts.zero_()
                call(factor, skip_counts=counts)

            found = calibrate_factors(counting, counts, [a.sparsity], float(ctx))
            # "dense": a factor so small that nothing is skipped, so the same instrumented
            # variant (threshold compiled in) runs.
            for label, factor in [("dense", 1e-30)] + [(f"s{t}", f) for t, (f, _) in found.items()]:
                stamps = torch.zeros(batch, hkv * -(-hq // hkv // bd.Q_TILE_ROWS), splits * STAMPS,
                                     dtype=torch.int32, device="cuda")
                for _ in range(5):  # the last call's stamps are kept
                    call(factor, decisions=stamps, timeline=True)
                torch.cuda.synchronize()
                rows = stamps.view(-1, splits, STAMPS).reshape(-1, STAMPS).cpu().numpy().astype(np.int64)
                run = {"batch": batch, "context": ctx, "num_q_heads": hq, "page": page, "splits": shape._asdict(),
                       "label": label, "factor": factor, **summarize(rows, sms * RESIDENT_SLOTS_PER_SM)}
                if a.raw:
                    run["stamps"] = rows.tolist()
                res["runs"].append(run)
                print(f"B{batch} {ctx // 1024}K {hq}/{hkv} p{page} {shape} {label}: span {run['span_us']:.1f} us, "
                      f"work {run['work_us']:.1f} (busy {run['busy']:.3f}), tail {run['tail_us']:.1f}, prologue "
                      f"{run['prologue_us_median']:.2f}, loop {run['loop_us_min']:.1f}..{run['loop_us_max']:.1f}, "
                      f"kept median {run['kept_tiles_median']:.0f} max {run['kept_tiles_max']}", flush=True)
                with open(a.out, "w") as fh:
                    json.dump(res, fh, indent=1)
        w = q = kc = vc = ws = heuristic_ws = None
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
