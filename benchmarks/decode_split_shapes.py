"""Split shapes for the BLASST decode kernel (H200): equal splits against long-then-short
("tapered") splits, each at its own calibrated factor.

The kernel's CTAs are dispatched split-major, so with ``long_splits`` L the first waves
run the long splits and the last wave the short ones: the warps that finish early pick up
short work instead of idling while the slowest long split ends
(``benchmarks/decode_timeline.py`` measured ~13% idle slots at B = 8 x 32K, s 0.7, with
equal splits). A split shape changes which tiles are eligible and how the running max
evolves, so each shape gets its own factor (bisection with the kernel's skip counters),
and its speedup is judged against the bar at the sparsity it reached.

Shapes (``--shapes``), with W counted in waves of resident warps
(``bd.splits_filling_waves``):

* ``u:W``: W waves of equal splits (the heuristic's shape before long splits was ``u:3``
  at B = 8 and ``u:5`` at B >= 32);
* ``t:W:F:R``: W waves of long splits, then ``round(F * long)`` short splits, the long
  ones R times as long (the heuristic's shape is ``t:2:0.5:4`` at B = 8, ``t:4:0.5:4`` at
  B >= 32 when the short splits keep at least 12 tiles).

The heuristic's own shape (``bd.split_shape_heuristic``) is always timed, as
``heuristic``. ``--baseline-module PATH`` adds another copy of the kernel module (e.g.
b9fdabe's, with split-fastest dispatch and equal splits only) timed with the equal splits
the heuristic chose before long splits (``u:3`` below one (request, KV head) per SM,
``u:5`` from there).

    cd benchmarks && python decode_split_shapes.py --out $OUT/split_shapes.json \\
        --baseline-module /path/to/old/blasst_decode.py
"""

import argparse
import time

import torch

from decode_variants import cell_inputs, load_module, save_and_release, sparsity_columns, variant_runner
from vllm_blackwell_sparse.bench.decode import calibrate_factors, interleaved_medians, vllm_fa_decode
from vllm_blackwell_sparse.bench.topk import environment
from vllm_blackwell_sparse.kernels import blasst_decode as bd

# (batch, context, num_q_heads, page)
CELLS = [(8, 32768, 32, 16), (8, 32768, 32, 64), (8, 32768, 64, 16), (8, 32768, 64, 64), (8, 65536, 32, 16),
         (32, 32768, 32, 16), (64, 32768, 32, 16)]
SHAPES = ["u:2", "u:3", "u:5", "t:2:1:4", "t:2:1:6", "t:3:0.67:4", "t:2:0.5:4", "t:1:3:6", "t:4:1:4"]


def split_shape(spec: str, warps: int, ctx: int, sms: int) -> tuple[int, int, int]:
    """``(num_splits, long_splits, long_split_ratio)`` of a ``--shapes`` entry for a batch
    with ``warps`` (request, KV head, row tile) triples."""
    parts = spec.split(":")
    try:
        if parts[0] == "u" and len(parts) == 2:
            return bd.splits_filling_waves(int(parts[1]), warps, ctx, sms, bd.MIN_TILES_PER_SPLIT), 0, 1
        if parts[0] == "t" and len(parts) == 4:
            long = bd.splits_filling_waves(int(parts[1]), warps, ctx, sms, 1)
            short = max(1, round(float(parts[2]) * long))
            return min(long + short, bd.MAX_SPLITS), long, int(parts[3])
    except ValueError:
        pass
    raise SystemExit(f"--shapes: expected u:W or t:W:F:R, got {spec!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cells", nargs="+", default=None, help="BATCHxCONTEXTxHQxPAGE (default: CELLS)")
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--baseline-module", default=None)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.7])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    cells = [tuple(int(x) for x in c.split("x")) for c in a.cells] if a.cells else CELLS
    base_mod = load_module(a.baseline_module) if a.baseline_module else None
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    hkv, d = 8, 128
    res = {"environment": environment(), "args": vars(a), "cells": []}
    for batch, ctx, hq, page in cells:
        t0 = time.time()
        w, q, kc, vc, table, lens, scale, heuristic, _, counts = cell_inputs(batch, ctx, hq, page, hkv, d)
        warps = batch * hkv * -(-hq // hkv // bd.Q_TILE_ROWS)
        shapes = {spec: split_shape(spec, warps, ctx, sms) for spec in a.shapes}
        shapes["heuristic"] = heuristic
        previous = split_shape("u:5" if warps >= sms else "u:3", warps, ctx, sms)
        ws = bd.decode_workspace(max(s[0] for s in [*shapes.values(), previous]), batch, hq, d, q.device)
        variants = {spec: (bd, bd.SplitShape(*shape)._asdict()) for spec, shape in shapes.items()}
        if base_mod is not None:
            variants["baseline"] = (base_mod, dict(num_splits=previous[0]))
        outs = {name: torch.empty_like(q) for name in variants}
        run = variant_runner(variants, outs, q, kc, vc, table, lens, scale, ws, counts)

        fa3_out = torch.empty_like(q)
        fns = {"fa3": vllm_fa_decode(w, fa3_out, 3, ctx)}
        fns["fa3"]()
        ref = fa3_out.float().clone()
        found, checks = {}, {}
        for name in variants:
            factors = calibrate_factors(lambda f, n=name: run(n, f, count=True), counts, a.sparsities, float(ctx))
            found[name] = {str(k): {"factor": v[0], "sparsity": v[1]} for k, v in factors.items()}
            for label, factor in [("dense", None)] + [(f"s{sp}", f) for sp, (f, _) in factors.items()]:
                run(name, factor)
                checks[f"{label}|{name}_max_err_vs_fa3"] = (outs[name].float() - ref).abs().max().item()
                fns[f"{label}|{name}"] = (lambda n=name, f=factor: run(n, f))
        times = interleaved_medians(fns, a.rounds, a.warmup)
        fa3 = times["fa3"]
        cell = {"batch": batch, "context": ctx, "num_q_heads": hq, "num_kv_heads": hkv, "page": page,
                "shapes": {name: dict(variants[name][1]) for name in variants}, "factors": found,
                "us": times, "checks": checks}
        res["cells"].append(cell)
        print(f"B{batch} {ctx // 1024}K {hq}/{hkv} p{page} fa3 {fa3:.1f} heuristic {tuple(heuristic)} "
              f"[{time.time() - t0:.0f}s]", flush=True)
        for name in variants:
            kw = variants[name][1]
            line = (f"  {name:>11} S{kw['num_splits']:>3} L{kw.get('long_splits', 0):>3} R{kw.get('long_split_ratio', 1)}:"
                    f" dense {times[f'dense|{name}']:.1f}")
            reached = [(sp, v["sparsity"]) for sp, v in found[name].items()]
            print(line + sparsity_columns(times, fa3, name, reached), flush=True)
        w = q = kc = vc = ws = ref = run = None  # run's closure holds the cache, and so do fns
        save_and_release(a.out, res, outs, fns)


if __name__ == "__main__":
    main()
