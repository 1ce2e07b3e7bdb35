"""Tuning sweep for the BLASST decode kernel (H200): K ring depth x split count.

For a few (batch, context, page) cells of ``workloads.peaked_decode_batch`` (GQA 32/8,
d 128, bf16) it times, in one run on the same cache: vLLM's FA3 (the best dense kernel
on Hopper), and our kernel dense and at factors calibrated to each target sparsity, for
every K ring depth (``k_stages``) and split count (whole waves of resident warps). The
factors are calibrated per split count, since the split count changes which tiles are
eligible. Writes JSON to ``--out``.

    python benchmarks/decode_tuning.py --out $OUT/decode_tuning.json
"""

import argparse
import json
import time

import torch

from vllm_blackwell_sparse import workloads
from vllm_blackwell_sparse.bench.decode import calibrate_factors, speedup_bar, time_us, vllm_fa_decode
from vllm_blackwell_sparse.bench.topk import environment
from vllm_blackwell_sparse.kernels import blasst_decode as bd

CELLS = [(8, 32768, 16), (8, 65536, 16), (8, 131072, 16), (32, 32768, 16), (32, 131072, 16), (64, 32768, 16),
         (64, 131072, 16), (8, 32768, 64), (32, 32768, 64), (64, 131072, 64)]
SWEEP_MIN_TILES_PER_SPLIT = 16  # looser than the heuristic's floor, so the sweep can see past it


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--waves", type=int, nargs="+", default=[2, 3, 5])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.7, 0.9])
    ap.add_argument("--cells", nargs="+", default=None, help="BATCHxCONTEXTxPAGE, e.g. 8x32768x16 (default: CELLS)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    hq, hkv, d = 32, 8, 128
    res = {"environment": environment(), "args": vars(a), "cells": []}
    cells = [tuple(int(x) for x in c.split("x")) for c in a.cells] if a.cells else CELLS
    for batch, ctx, page in cells:
        t0 = time.time()
        w = workloads.peaked_decode_batch(batch, ctx, hq, hkv, d, page, device="cuda")
        q, kc, vc, table, lens = (w[k] for k in ("q", "k_cache", "v_cache", "block_table", "seq_lens"))
        out = torch.empty_like(q)
        scale = d ** -0.5
        fa3 = time_us(vllm_fa_decode(w, out, 3, ctx), 2 * a.iters, a.warmup)
        ref = out.float().clone()
        counts = torch.zeros(batch, 2, dtype=torch.int32, device="cuda")
        ws = bd.decode_workspace(bd.MAX_SPLITS, batch, hq, d, "cuda")

        def run(factor, splits, ks, count=False):
            if count:
                counts.zero_()
            return bd.blasst_decode(q, kc, vc, table, lens, softmax_scale=scale, threshold_scale_factor=factor,
                                    num_splits=splits, out=out, workspace=ws, skip_counts=counts if count else None,
                                    k_stages=ks)

        cell = {"batch": batch, "context": ctx, "page": page, "fa3_us": fa3, "runs": []}
        kv_bytes = batch * ctx * hkv * d * 2
        for waves in a.waves:
            splits = bd.splits_filling_waves(waves, batch * hkv, ctx, sms, SWEEP_MIN_TILES_PER_SPLIT)

            # Sparsity does not depend on k_stages: calibrate with the default ring.
            factors = {sp: f for sp, (f, _) in calibrate_factors(
                lambda f: run(f, splits, 2, count=True), counts, a.sparsities, float(ctx)).items()}
            for ks in a.stages:
                row = {"waves": waves, "splits": splits, "k_stages": ks}
                row["dense_us"] = time_us(lambda: run(None, splits, ks), a.iters, a.warmup)
                run(None, splits, ks)
                row["dense_err"] = (out.float() - ref).abs().max().item()
                row["dense_vs_fa3"] = fa3 / row["dense_us"]
                for sp, factor in factors.items():
                    t = time_us(lambda: run(factor, splits, ks), a.iters, a.warmup)
                    run(factor, splits, ks, count=True)
                    s_, e_ = counts.sum(0).tolist()
                    got = s_ / max(e_, 1)
                    row[f"s{sp}"] = {"factor": factor, "us": t, "sparsity": got, "vs_fa3": fa3 / t,
                                     "bar": speedup_bar(got),
                                     "tb_s": kv_bytes * (2 - got) / t / 1e6,
                                     "max_err": (out.float() - ref).abs().max().item()}
                cell["runs"].append(row)
        print(f"B{batch} {ctx//1024}K p{page} fa3 {fa3:.0f}us [{time.time() - t0:.0f}s]", flush=True)
        for r in cell["runs"]:
            line = f"   W{r['waves']} S{r['splits']:3d} K{r['k_stages']}: dense {r['dense_us']:.0f} (x{r['dense_vs_fa3']:.2f})"
            for sp in a.sparsities:
                v = r.get(f"s{sp}")
                if v:
                    line += f" | s={v['sparsity']:.2f} {v['us']:.0f} x{v['vs_fa3']:.2f} (bar {v['bar']:.2f}) {v['tb_s']:.2f}TB/s"
            print(line, flush=True)
        res["cells"].append(cell)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        w = q = kc = vc = ws = ref = None  # free the cell's cache before the next one
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
