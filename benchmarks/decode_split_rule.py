"""Request-only split rules (``SplitRule``) against the batch-dependent heuristic they
replace, in one run on one host: BLASST decode GPU time, dense (threshold off) and at a
factor calibrated separately for each variant to the target sparsity (the split ranges
change which tiles are eligible, so each variant gets its own factor).

    python benchmarks/decode_split_rule.py --out $OUT/split_rule.json \\
        --rules 32x64,16x64,32x128,64x64 --cells 1x8192,1x32768,8x32768,32x32768,64x32768,8x131072,64x8192

Cells are ``BATCHxCONTEXT`` on the synthetic peaked batch (``workloads.peaked_decode_batch``),
``--gqa`` head shapes and ``--pages``; ``--real-model-shape`` adds SmolLM2-135M's shape
(9/3 heads, d 64, page 128) at batch 1 x 4K, 8 and 64 x 4K / 7K.
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from vllm_blackwell_sparse import workloads
from vllm_blackwell_sparse.bench.decode import calibrate_factors, gpu_call_us
from vllm_blackwell_sparse.bench.topk import environment
from vllm_blackwell_sparse.kernels import blasst_decode as bd


def parse_rule(text: str) -> bd.SplitRule:
    lo, hi = text.split("x")
    return bd.SplitRule(int(lo), int(hi)).check()


def cell_variants(batch, hkv, rows, ctx, rules):
    """``{name: kernel keyword arguments}``: the heuristic's explicit shape and each rule."""
    shape = bd.split_shape_heuristic(batch, hkv, rows, ctx, "cuda")
    variants = {f"heuristic({shape.num_splits},{shape.long_splits},{shape.long_split_ratio})": shape._asdict()}
    for rule in rules:
        variants[f"rule{rule.min_tiles}x{rule.target_splits}"] = {"split_rule": rule, "max_seq_len": ctx}
    return variants


def bench_cell(batch, ctx, hq, hkv, d, page, rules, target, rounds, warmup):
    w = workloads.peaked_decode_batch(batch, ctx, hq, hkv, d, page, device="cuda",
                                      params=workloads.PeakedAttentionParams(seed=batch * 7 + ctx))
    q, kc, vc, table, lens = (w[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens"))
    out = torch.empty_like(q)
    counts = torch.zeros(batch, 2, dtype=torch.int32, device="cuda")
    variants = cell_variants(batch, hkv, hq // hkv, ctx, rules)
    cell = {"batch": batch, "context": ctx, "num_q_heads": hq, "num_kv_heads": hkv, "head_dim": d, "page": page,
            "variants": {}}
    kv_bytes = batch * ctx * hkv * d * kc.element_size()
    calls = {}
    for name, kw in variants.items():
        def run(factor, kw=kw, count=False):
            if count:
                counts.zero_()
            return bd.blasst_decode(q, kc, vc, table, lens, softmax_scale=d ** -0.5, threshold_scale_factor=factor,
                                    out=out, skip_counts=counts if count else None, **kw)

        found = calibrate_factors(lambda f, run=run: run(f, count=True), counts, [target], float(ctx))
        factor, sparsity = found.get(target, (None, None))
        grid = kw["num_splits"] if "num_splits" in kw else kw["split_rule"].max_split_count(-(-ctx // bd.KV_TILE))
        cell["variants"][name] = {"factor": factor, "sparsity": sparsity, "grid_splits": grid}
        calls[f"{name}|dense"] = lambda run=run: run(None)
        if factor is not None:
            calls[f"{name}|sparse"] = lambda run=run, factor=factor: run(factor)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times = {k: [] for k in calls}
    for _ in range(rounds):  # interleaved: every variant once per round
        for k, fn in calls.items():
            times[k].append(gpu_call_us(fn))
    for k, t in times.items():
        name, mode = k.split("|")
        v = cell["variants"][name]
        v[f"{mode}_us"] = statistics.median(t)
        s = v["sparsity"] if mode == "sparse" else 0.0
        v[f"{mode}_tb_s"] = kv_bytes * (2 - s) / v[f"{mode}_us"] / 1e6
    base = next(iter(cell["variants"].values()))
    for v in cell["variants"].values():
        for mode in ("dense", "sparse"):
            if f"{mode}_us" in v and f"{mode}_us" in base:
                v[f"{mode}_vs_heuristic"] = base[f"{mode}_us"] / v[f"{mode}_us"]
    del w
    torch.cuda.empty_cache()
    return cell


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rules", default="32x64,16x64,32x128,64x64")
    p.add_argument("--cells", default="1x8192,1x32768,1x131072,8x32768,8x131072,32x32768,64x8192,64x32768")
    p.add_argument("--gqa", default="32/8")
    p.add_argument("--pages", default="16")
    p.add_argument("--real-model-shape", action="store_true")
    p.add_argument("--target", type=float, default=0.7)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    rules = [parse_rule(r) for r in a.rules.split(",")]
    jobs = []
    for gqa in a.gqa.split(","):
        hq, hkv = (int(x) for x in gqa.split("/"))
        for page in (int(x) for x in a.pages.split(",")):
            for c in a.cells.split(","):
                b, ctx = (int(x) for x in c.split("x"))
                jobs.append((b, ctx, hq, hkv, 128, page))
    if a.real_model_shape:
        jobs = [(b, ctx, 9, 3, 64, 128) for b, ctx in ((1, 4096), (8, 4096), (8, 7000), (64, 4096), (64, 7000))] + jobs
    res = {"environment": environment(), "args": vars(a), "cells": []}
    out = Path(a.out)
    for job in jobs:
        cell = bench_cell(*job, rules, a.target, a.rounds, a.warmup)
        res["cells"].append(cell)
        out.write_text(json.dumps(res, indent=1))
        parts = [f"B{job[0]} x {job[1]} {job[2]}/{job[3]} d{job[4]} p{job[5]}:"]
        for name, v in cell["variants"].items():
            parts.append(f"{name} dense {v['dense_us']:.1f} ({v.get('dense_vs_heuristic', 1):.3f})"
                         + (f" s{v['sparsity']:.2f} {v['sparse_us']:.1f} ({v.get('sparse_vs_heuristic', 1):.3f})"
                            if "sparse_us" in v else " sparse -"))
        print(" | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
