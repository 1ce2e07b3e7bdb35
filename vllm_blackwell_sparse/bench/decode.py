"""``vbs bench decode``: BLASST decode vs dense FA3 / FA4 on the same paged cache.

For every (batch, context, GQA, page size) cell, on one synthetic peaked-attention batch
(``workloads.peaked_decode_batch``): vLLM's FA3 and FA4 (``flash_attn_varlen_func`` with
``fa_version`` 3 / 4), our kernel with the threshold off, and our kernel at factors
calibrated (bisection with the kernel's own skip counters) to reach each target
sparsity. Reported per kernel: median µs, bandwidth of the bytes actually read (K of
every tile, V of the kept ones), sparsity with both counts, output error against FA3's
output (max and mean abs), speedup over the best dense kernel.

Times are the GPU's (``us``: the host's launch hidden behind a spin kernel, see
``bench.timing``), as in a CUDA-graph replay, which is how vLLM runs decode; speedups use
them. ``us_with_launch`` is the time an eager caller waits (host launch included), kept
for reference: benchmark results before 2026-12-01 reported that one.
"""

import json
import math
import statistics
from pathlib import Path

import torch

from vllm_blackwell_sparse import workloads
from vllm_blackwell_sparse.bench.timing import checked_gpu_us, event_us
from vllm_blackwell_sparse.bench.topk import environment

DEFAULT_BATCHES = (1, 8, 32, 64)
DEFAULT_CONTEXTS = (8192, 32768, 65536, 131072)
DEFAULT_GQA = ((32, 8), (64, 8))
DEFAULT_PAGES = (16, 64)
DEFAULT_SPARSITIES = (0.5, 0.7, 0.9)
HEAD_DIM = 128


# The GPU spins this long before each timed call (bench.timing.checked_gpu_us): ~1 ms at the
# H200's clock, far above the host time of any decode wrapper timed here (checked per call).
SPIN_CYCLES = 2_000_000


def gpu_call_us(fn) -> float:
    """GPU µs of one call of ``fn`` (bench.timing.checked_gpu_us: the host's launch hidden
    behind a spin, refused if it outlasted the spin)."""
    return checked_gpu_us(fn, SPIN_CYCLES)


def time_us(fn, iters: int, warmup: int, *, with_launch: bool = False) -> float:
    """Median µs of ``iters`` calls of ``fn`` after ``warmup`` calls: the GPU's time
    (:func:`gpu_call_us`), or, ``with_launch``, the time an eager caller waits, host launch
    included (CUDA events around the call on an idle GPU)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    timer = event_us if with_launch else gpu_call_us
    return statistics.median(timer(fn) for _ in range(iters))


def interleaved_medians(fns: dict, rounds: int, warmup: int) -> dict:
    """Median GPU µs (:func:`gpu_call_us`) of each callable, timed one call each per round,
    round after round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(gpu_call_us(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def calibrate(run_sparsity, target: float, hi: float, steps: int = 14):
    """Smallest factor (bisection on its log over ``[1e-3, hi]``) whose measured
    sparsity reaches ``target``: ``(factor, sparsity)`` or None when ``hi`` does not."""
    lo, best = 1e-3, None
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        sp = run_sparsity(mid)
        if sp >= target:
            hi, best = mid, (mid, sp)
        else:
            lo = mid
    return best


def speedup_bar(sparsity: float) -> float:
    """The BLASST decode issue's bar at skipped fraction ``sparsity``: 0.9 of the bound
    1 / (0.5 + 0.5 (1 - s)) that skipping V alone allows (K is always read)."""
    return 0.9 / (0.5 + 0.5 * (1 - sparsity))


def calibrate_factors(run_counting, counts: torch.Tensor, targets, hi: float) -> dict:
    """``{target: (factor, sparsity)}`` for each target sparsity :func:`calibrate` reaches;
    ``run_counting(factor)`` runs the kernel with its skip counters zeroed into ``counts``
    (int32 ``[B, 2]``: skipped, eligible)."""
    def sparsity_at(factor):
        run_counting(factor)
        skipped, eligible = counts.sum(0).tolist()
        return skipped / max(eligible, 1)

    found = {t: calibrate(sparsity_at, t, hi) for t in targets}
    return {t: v for t, v in found.items() if v is not None}


def vllm_fa_decode(w: dict, out: torch.Tensor, version: int, max_seq_len: int):
    """A call of vLLM's FA3 / FA4 (``fa_version``) dense decode on the batch ``w`` of
    ``workloads.peaked_decode_batch`` (one token per request), writing ``out``."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    return lambda: flash_attn_varlen_func(
        q=w["q"], k=w["k_cache"], v=w["v_cache"], out=out, cu_seqlens_q=w["cu_seqlens_q"], max_seqlen_q=1,
        seqused_k=w["seq_lens"], max_seqlen_k=max_seq_len, softmax_scale=w["q"].shape[-1] ** -0.5,
        causal=True, block_table=w["block_table"], num_splits=0, fa_version=version,
    )


def bench_cell(batch, context, hq, hkv, page, sparsities, iters, warmup, splits="rule") -> dict:
    from vllm_blackwell_sparse.kernels import blasst_decode as bd

    d = HEAD_DIM
    w = workloads.peaked_decode_batch(batch, context, hq, hkv, d, page, device="cuda")
    q, kc, vc = w["q"], w["k_cache"], w["v_cache"]
    table, lens = w["block_table"], w["seq_lens"]
    scale = d ** -0.5
    out = torch.empty_like(q)
    kv_bytes = batch * context * hkv * d * kc.element_size()  # one of K or V

    cell = {"batch": batch, "context": context, "num_q_heads": hq, "num_kv_heads": hkv, "head_dim": d, "page": page,
            "workload": w["params"], "kernels": {}}
    for name, version in (("fa3", 3), ("fa4", 4)):
        try:
            fn = vllm_fa_decode(w, out, version, context)
            t = time_us(fn, iters, warmup)
            cell["kernels"][name] = {"us": t, "tb_s": 2 * kv_bytes / t / 1e6,
                                     "us_with_launch": time_us(fn, iters, 0, with_launch=True)}
        except Exception as e:  # noqa: BLE001 - recorded, the others still run
            cell["kernels"][name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    vllm_fa_decode(w, out, 3, context)()
    reference = out.float().clone()
    dense_times = [k["us"] for k in cell["kernels"].values() if "us" in k]
    best_dense = min(dense_times) if dense_times else None

    # The backend's path (the request-only DEFAULT_SPLIT_RULE), or the batch-dependent
    # heuristic it replaced (splits="heuristic").
    if splits == "heuristic":
        shape = bd.split_shape_heuristic(batch, hkv, hq // hkv, context, q.device)._asdict()
        grid = shape["num_splits"]
    else:
        shape = {"split_rule": bd.DEFAULT_SPLIT_RULE, "max_seq_len": context}
        grid = bd.DEFAULT_SPLIT_RULE.max_split_count(-(-context // bd.KV_TILE))
    ws = bd.decode_workspace(grid, batch, hq, d, q.device)
    counts = torch.zeros(batch, 2, dtype=torch.int32, device=q.device)

    def ours(factor, count=False):
        if count:
            counts.zero_()
        return bd.blasst_decode(q, kc, vc, table, lens, softmax_scale=scale, threshold_scale_factor=factor,
                                out=out, workspace=ws, skip_counts=counts if count else None, **shape)

    def record(name, factor, extra):
        t = time_us(lambda: ours(factor), iters, warmup)
        t_launch = time_us(lambda: ours(factor), iters, 0, with_launch=True)
        ours(factor, count=factor is not None)
        err = (out.float() - reference).abs()
        skipped, eligible = counts.sum(0).tolist() if factor is not None else (0, 0)
        sparsity = skipped / eligible if eligible else 0.0
        read = kv_bytes * (2 - sparsity)  # K always, V of kept tiles (first tiles ~ eligible share)
        cell["kernels"][name] = {
            "us": t, "tb_s": read / t / 1e6, "factor": factor, "skipped_tiles": skipped, "eligible_tiles": eligible,
            "sparsity": sparsity, "max_abs_err": err.max().item(), "mean_abs_err": err.mean().item(),
            "speedup_vs_best_dense": best_dense / t if best_dense else None, "splits": splits, "grid_splits": grid,
            "us_with_launch": t_launch, **extra,
        }

    record("ours_dense", None, {})
    factors = calibrate_factors(lambda f: ours(f, count=True), counts, sparsities, float(context))
    for target in sparsities:
        if target not in factors:
            cell["kernels"][f"ours_s{target}"] = {"unreached": True, "target_sparsity": target}
            continue
        record(f"ours_s{target}", factors[target][0], {"target_sparsity": target})
    cell["best_dense_us"] = best_dense
    return cell


def run_decode_bench(batches, contexts, gqa, pages, sparsities, iters, warmup, log=print, on_cell=None,
                     splits="rule") -> dict:
    result = {"environment": environment(), "head_dim": HEAD_DIM, "iters": iters, "warmup": warmup,
              "timing": "us: GPU time, host launch hidden behind a spin kernel (bench.timing.gpu_us); "
                        "us_with_launch: CUDA events around the call on an idle GPU", "cells": []}
    for hq, hkv in gqa:
        for page in pages:
            for batch in batches:
                for context in contexts:
                    cell = bench_cell(batch, context, hq, hkv, page, sparsities, iters, warmup, splits)
                    torch.cuda.empty_cache()  # the cell's cache (up to tens of GB) is gone
                    result["cells"].append(cell)
                    log(row_text(cell))
                    if on_cell:
                        on_cell(result)  # partial results survive a time limit
    return result


def row_text(cell) -> str:
    k = cell["kernels"]

    def us(name):
        v = k.get(name, {})
        return f"{v['us']:.1f}" if "us" in v else "-"

    parts = [f"B{cell['batch']} ctx{cell['context'] // 1024}K {cell['num_q_heads']}/{cell['num_kv_heads']} page{cell['page']}:",
             f"fa3 {us('fa3')} fa4 {us('fa4')} ours-dense {us('ours_dense')}"]
    for name, v in k.items():
        if name.startswith("ours_s") and "us" in v:
            parts.append(f"{name} {v['us']:.1f} (s={v['sparsity']:.2f}, x{v['speedup_vs_best_dense']:.2f}, err {v['max_abs_err']:.3f})")
    return " ".join(parts)


def markdown_table(result: dict) -> str:
    targets = sorted({v["target_sparsity"] for c in result["cells"] for v in c["kernels"].values() if "target_sparsity" in v})
    head = "| B | ctx | GQA | page | FA3 µs | FA4 µs | ours dense µs (vs best) | " + " | ".join(
        f"s≈{t}: µs, sparsity, speedup, max/mean err" for t in targets) + " |"
    lines = [head, "|" + "---|" * (7 + len(targets))]
    for c in result["cells"]:
        k = c["kernels"]

        def us(name):
            v = k.get(name, {})
            return f"{v['us']:.0f}" if "us" in v else "err"

        dense = k.get("ours_dense", {})
        row = [str(c["batch"]), f"{c['context'] // 1024}K", f"{c['num_q_heads']}/{c['num_kv_heads']}", str(c["page"]),
               us("fa3"), us("fa4"),
               f"{dense['us']:.0f} ({dense['speedup_vs_best_dense']:.2f}×)" if "us" in dense else "err"]
        for t in targets:
            v = k.get(f"ours_s{t}", {})
            row.append(f"{v['us']:.0f}, {v['sparsity']:.2f}, **{v['speedup_vs_best_dense']:.2f}×**, "
                       f"{v['max_abs_err']:.3f}/{v['mean_abs_err']:.4f}" if "us" in v else "not reached")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(args) -> int:
    if not torch.cuda.is_available():
        print("vbs bench decode: no CUDA device here; the benchmark times GPU kernels and needs an sm90/sm100 GPU.")
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run_decode_bench(
        args.batches, args.contexts, args.gqa, args.pages, args.sparsities, args.iters, args.warmup,
        on_cell=lambda r: out.write_text(json.dumps(r, indent=1)), splits=args.splits,
    )
    out.write_text(json.dumps(result, indent=1))
    md = markdown_table(result)
    out.with_suffix(".md").write_text(md + "\n")
    print("\n" + md + f"\n\nwrote {out} and {out.with_suffix('.md')}")
    return 0
