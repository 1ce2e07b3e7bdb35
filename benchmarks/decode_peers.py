"""BLASST decode beside the kernels a user could pick instead, on one paged cache, in one
run: vLLM's FA3 (as FLASH_ATTN calls it under full CUDA graphs: scheduler metadata and
32 splits at most, and plainly), our kernel dense and at a factor calibrated to the
target sparsity, and NVIDIA ModelOpt 0.47's Triton skip-softmax kernel
(``modelopt/torch/kernels/common/attention/triton_fa.py``) dense and at the same λ.
Also the host time of one call of each wrapper (what an eager step pays per layer),
ours against the kernel module of an older commit (``--baseline-module``).

    python benchmarks/decode_peers.py --out $OUT/peers.json --modelopt-wheel .whl/modelopt/nvidia_modelopt-0.47.0-py3-none-any.whl \\
        --baseline-module .baseline/blasst_decode_a8192f3.py

ModelOpt's kernel takes one λ per launch (a compile-time constant: each new value
compiles once, excluded here by a warm-up), so every cell has requests of one length.
It is imported from the unpacked wheel with its package ``__init__`` files stubbed (they
import all of ModelOpt, which needs packages the GPU host lacks); the kernel file needs
only torch and triton. Its sparsity counters count 128-key tiles per query head (its
measuring mode), ours 16-key tiles per GQA group: both are reported, not compared.
"""

import argparse
import importlib
import importlib.util
import json
import math
import pathlib
import statistics
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path

import torch

from vllm_blackwell_sparse import workloads
from vllm_blackwell_sparse.bench.decode import calibrate_factors, gpu_call_us
from vllm_blackwell_sparse.bench.topk import environment
from vllm_blackwell_sparse.kernels import blasst_decode as bd

_MODELOPT_PACKAGES = (
    "modelopt", "modelopt.torch", "modelopt.torch.kernels", "modelopt.torch.kernels.common",
    "modelopt.torch.kernels.common.attention", "modelopt.torch.kernels.sparsity",
    "modelopt.torch.kernels.sparsity.attention", "modelopt.torch.kernels.quantization",
    "modelopt.torch.kernels.quantization.attention", "modelopt.torch.kernels.quantization.common",
)


def load_modelopt_attention(wheel: str):
    """ModelOpt's ``triton_fa`` module from its wheel, package ``__init__`` files stubbed."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="modelopt-"))
    zipfile.ZipFile(wheel).extractall(root)
    for name in _MODELOPT_PACKAGES:
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(root.joinpath(*name.split(".")))]
            sys.modules[name] = mod
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, mod)
    fa = importlib.import_module("modelopt.torch.kernels.common.attention.triton_fa")
    fa._load_sparsity_helpers()
    fa._load_qdq_helpers()
    return fa


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def host_us_per_call(fn, calls=300) -> float:
    """Host time of one call, launches queued without waiting (the GPU trails behind)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def bench_cell(batch, ctx, hq, hkv, d, page, target, rounds, fa, baseline):
    from vllm.vllm_flash_attn import flash_attn_varlen_func
    from vllm.vllm_flash_attn.flash_attn_interface import get_scheduler_metadata

    w = workloads.peaked_decode_batch(batch, ctx, hq, hkv, d, page, device="cuda",
                                      params=workloads.PeakedAttentionParams(seed=batch + ctx))
    q, kc, vc, table, lens, cu = (w[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens", "cu_seqlens_q"))
    out = torch.empty_like(q)
    scale = d ** -0.5
    counts = torch.zeros(batch, 2, dtype=torch.int32, device="cuda")
    kv_bytes = 2 * batch * ctx * hkv * d * kc.element_size()

    def ours(factor, count=False, mod=bd):
        if count:
            counts.zero_()
        return mod.blasst_decode(q, kc, vc, table, lens, softmax_scale=scale, threshold_scale_factor=factor,
                                 max_seq_len=ctx, out=out, skip_counts=counts if count else None)

    def sparsity_of(mod):
        ours(factor, count=True, mod=mod)
        skipped, eligible = counts.sum(0).tolist()
        return skipped / max(eligible, 1)

    found = calibrate_factors(lambda f: ours(f, count=True), counts, [target], float(ctx))
    factor, sparsity = found.get(target, (None, None))
    md = get_scheduler_metadata(batch_size=batch, max_seqlen_q=1, max_seqlen_k=ctx, num_heads_q=hq, num_heads_kv=hkv,
                                headdim=d, cache_seqlens=lens, qkv_dtype=q.dtype, cu_seqlens_q=cu, page_size=page,
                                causal=True, num_splits=32)

    def fa3(planned):
        extra = {"scheduler_metadata": md, "num_splits": 32} if planned else {"num_splits": 0}
        return flash_attn_varlen_func(q=q, k=kc, v=vc, out=out, cu_seqlens_q=cu, max_seqlen_q=1, seqused_k=lens,
                                      max_seqlen_k=ctx, softmax_scale=scale, causal=True, block_table=table,
                                      fa_version=3, **extra)

    calls = {"fa3 (vLLM full-graph recipe)": lambda: fa3(True), "fa3 (num_splits=0)": lambda: fa3(False),
             "ours dense": lambda: ours(None)}
    if factor is not None:
        calls["ours BLASST"] = lambda: ours(factor)
        calls["ours BLASST counting (+ a zero_)"] = lambda: ours(factor, count=True)  # VBS_BLASST_STATS's kernel
    if baseline is not None:  # the older commit's kernel with its own (batch-dependent) split shape
        calls["baseline dense"] = lambda: ours(None, mod=baseline)
        if factor is not None:
            calls["baseline BLASST"] = lambda: ours(factor, mod=baseline)
    mo = {}
    if fa is not None:
        ar = torch.arange(batch, device="cuda", dtype=torch.int32)
        ones, zeros = torch.ones_like(ar), torch.zeros_like(ar)
        dummy = kc[:0, 0]

        def modelopt(lam, measure=False):
            return fa.attention(q, dummy, dummy, ar, ones, 1, is_causal=False, softmax_scale=scale,
                                b_start_loc_k=zeros, b_seq_len_k=lens, max_input_len_k=ctx,
                                skip_softmax_threshold=lam, measure_sparsity=measure, k_cache=kc, v_cache=vc,
                                block_table=table, page_size=page)

        fa._attn_fwd.cache.clear()  # autotune for this shape (its key is the same for every decode)
        calls["modelopt dense"] = lambda: modelopt(None)
        if factor is not None:
            lam = factor / ctx
            calls["modelopt skip-softmax"] = lambda: modelopt(lam)
            m = modelopt(lam, measure=True)
            mo = {"lambda": lam, "skipped": int(m._sparsity_skipped), "total": int(m._sparsity_total),
                  "tile": "128 keys per query head (ModelOpt's measuring mode)"}
            err = (modelopt(lam).float() - ours(factor).float()).abs().max().item()
            mo["max_abs_diff_vs_ours"] = err
    for fn in calls.values():
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            times[k].append(gpu_call_us(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    best_dense = min(med["fa3 (vLLM full-graph recipe)"], med["fa3 (num_splits=0)"])
    cell = {"batch": batch, "context": ctx, "num_q_heads": hq, "num_kv_heads": hkv, "head_dim": d, "page": page,
            "factor": factor, "sparsity": sparsity, "modelopt_sparsity": mo, "us": med,
            "baseline_sparsity": sparsity_of(baseline) if baseline is not None and factor is not None else None,
            "speedup_vs_best_fa3": {k: best_dense / v for k, v in med.items()},
            "dense_tb_s": {k: kv_bytes / v / 1e6 for k, v in med.items() if "dense" in k or "fa3" in k}}
    host = {"ours dense": host_us_per_call(lambda: ours(None)), "fa3 (num_splits=0)": host_us_per_call(lambda: fa3(False))}
    if factor is not None:
        host["ours BLASST"] = host_us_per_call(lambda: ours(factor))
    if baseline is not None:
        host["baseline dense"] = host_us_per_call(lambda: ours(None, mod=baseline))
        if factor is not None:
            host["baseline BLASST"] = host_us_per_call(lambda: ours(factor, mod=baseline))
    cell["host_us_per_call"] = host
    del w
    torch.cuda.empty_cache()
    return cell


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cells", default="8x4096x9/3x64x128,64x7000x9/3x64x128,8x32768x32/8x128x16,32x8192x32/8x128x16",
                   help="BATCHxCONTEXTxHQ/HKVxDxPAGE, comma-separated")
    p.add_argument("--target", type=float, default=0.7)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--modelopt-wheel", default=None)
    p.add_argument("--baseline-module", default=None, help="an older commit's kernels/blasst_decode.py")
    a = p.parse_args()
    fa = load_modelopt_attention(a.modelopt_wheel) if a.modelopt_wheel else None
    baseline = load_module(a.baseline_module, "baseline_blasst_decode") if a.baseline_module else None
    res = {"environment": environment(), "args": vars(a), "cells": []}
    for spec in a.cells.split(","):
        b, ctx, heads, d, page = spec.split("x")
        hq, hkv = (int(v) for v in heads.split("/"))
        cell = bench_cell(int(b), int(ctx), hq, hkv, int(d), int(page), a.target, a.rounds, fa, baseline)
        res["cells"].append(cell)
        Path(a.out).write_text(json.dumps(res, indent=1))
        us = ", ".join(f"{k} {v:.1f}" for k, v in cell["us"].items())
        host = ", ".join(f"{k} {v:.1f}" for k, v in cell["host_us_per_call"].items())
        print(f"B{b} x {ctx} {heads} d{d} p{page} s={cell['sparsity']}: {us} | host µs/call: {host}", flush=True)


if __name__ == "__main__":
    main()
