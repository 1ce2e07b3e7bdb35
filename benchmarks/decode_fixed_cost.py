"""Where the BLASST decode call's time goes at small batch (H200): the decode kernel and
the split merge timed apart, against the whole call and vLLM's FA3, all interleaved round
by round on the same cache (GPU time, ``bench.decode.interleaved_medians``).

For each cell (d 128, bf16, ``workloads.peaked_decode_batch``, one factor calibrated to
~0.7 skipped tiles) it times:

* ``fa3``: vLLM's FA3 dense decode;
* ``call``: ``blasst_decode`` as the backend runs it (heuristic split count);
* ``decode_only`` / ``combine_only``: its two kernels launched alone (``combine_only`` on
  the partials the decode left; without PDL, so it is the kernel's own time);
* ``call_no_pdl``: the two kernels without programmatic dependent launch;
* ``baseline_call`` / ``baseline_combine_only`` with ``--baseline-module PATH`` (another
  copy of ``blasst_decode.py``, e.g. an older commit's).

(Other split counts are compared in ``decode_tuning.py``, which calibrates the factor per
split count: at one factor, fewer splits skip more tiles.)

It records each variant's largest output difference from the baseline call (bf16
rounding is expected: the merge order differs; nothing fails on it) and writes JSON to
``--out``.

    cd benchmarks && python decode_fixed_cost.py --out $OUT/fixed_cost.json \\
        --baseline-module /path/to/old/blasst_decode.py
"""

import argparse
import json
import math
import time

import torch

from decode_variants import cell_inputs, load_module, module_shape_kwargs
from vllm_blackwell_sparse.bench.decode import calibrate_factors, interleaved_medians, vllm_fa_decode
from vllm_blackwell_sparse.bench.topk import environment
from vllm_blackwell_sparse.kernels import blasst_decode as bd

# (batch, context, num_q_heads, page)
CELLS = [(8, 8192, 32, 16), (8, 32768, 32, 16), (8, 65536, 32, 16), (8, 32768, 64, 64), (32, 32768, 32, 16)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cells", nargs="+", default=None, help="BATCHxCONTEXTxHQxPAGE (default: CELLS)")
    ap.add_argument("--baseline-module", default=None)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    cells = [tuple(int(x) for x in c.split("x")) for c in a.cells] if a.cells else CELLS
    base = load_module(a.baseline_module) if a.baseline_module else None
    hkv, d = 8, 128
    res = {"environment": environment(), "args": vars(a), "cells": []}
    for batch, ctx, hq, page in cells:
        t0 = time.time()
        w, q, kc, vc, table, lens, scale, shape, ws, counts = cell_inputs(batch, ctx, hq, page, hkv, d)

        def call(factor, out=None, mod=bd, count=False):
            if count:
                counts.zero_()
            return mod.blasst_decode(q, kc, vc, table, lens, softmax_scale=scale, threshold_scale_factor=factor,
                                     out=out, workspace=ws, skip_counts=counts if count else None,
                                     **module_shape_kwargs(mod, shape._asdict()))

        factors = calibrate_factors(lambda f: call(f, count=True), counts, [a.sparsity], float(ctx))
        if not factors:
            print(f"B{batch} {ctx // 1024}K: sparsity {a.sparsity} not reached, cell skipped", flush=True)
            continue
        factor, sparsity = factors[a.sparsity]
        decode = bd.compile_blasst_decode(head_dim=d, group=hq // hkv, next_n=1, block_size=page, dtype=q.dtype,
                                          has_threshold=True, count_skips=False, final_output=False)
        combine_plain = bd.compile_blasst_combine(head_dim=d, dtype=q.dtype, use_pdl=False)
        o_part, lse_part = ws
        outs = {}

        def out_of(name):
            return outs.setdefault(name, torch.empty_like(q))

        def decode_only():
            decode(q, kc, vc, table, lens, out_of("decode_only"), o_part, lse_part, lens, lens.view(1, 1, -1),
                   scale * bd.LOG2E, math.log2(factor), *shape)

        fns = {
            "fa3": vllm_fa_decode(w, out_of("fa3"), 3, ctx),
            "call": lambda: call(factor, out=out_of("call")),
            "decode_only": decode_only,
            "combine_only": lambda: combine_plain(o_part, lse_part, out_of("combine_only")),
            "call_no_pdl": lambda: (decode_only(), combine_plain(o_part, lse_part, out_of("call_no_pdl"))),
        }
        if base is not None:
            base_combine = base.compile_blasst_combine(head_dim=d, dtype=q.dtype)
            fns["baseline_call"] = lambda: call(factor, out=out_of("baseline_call"), mod=base)
            fns["baseline_combine_only"] = lambda: base_combine(o_part, lse_part, out_of("baseline_combine_only"))
        # Outputs first (each callable once, fresh partials for the merge-only ones), then times.
        checks = {}
        fns["fa3"]()
        for name in ("baseline_call", "call") if base is not None else ("call",):
            fns[name]()
        ref_name = "baseline_call" if base is not None else "call"
        ref = outs[ref_name].float().clone()
        for name, fn in fns.items():
            if name in ("fa3", ref_name):
                continue
            if name.endswith("combine_only"):
                decode_only()
            fn()
            if name != "decode_only":
                checks[f"{name}_max_abs_diff_vs_{ref_name}"] = (outs[name].float() - ref).abs().max().item()
        times = interleaved_medians(fns, a.rounds, a.warmup)
        cell = {"batch": batch, "context": ctx, "num_q_heads": hq, "num_kv_heads": hkv, "page": page,
                "splits": shape._asdict(), "factor": factor, "sparsity": sparsity, "us": times, "checks": checks}
        res["cells"].append(cell)
        print(f"B{batch} {ctx // 1024}K {hq}/{hkv} p{page} {shape} s{sparsity:.3f} [{time.time() - t0:.0f}s]",
              flush=True)
        fa3 = times["fa3"]
        for name, t in times.items():
            diff = checks.get(f"{name}_max_abs_diff_vs_{ref_name}")
            print(f"  {name:>22}: {t:7.1f} us  fa3/this {fa3 / t:.3f}" + (f"  maxdiff {diff:.2e}" if diff is not None else ""),
                  flush=True)
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)
        w = q = kc = vc = ws = o_part = lse_part = ref = None
        outs.clear()
        fns.clear()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
