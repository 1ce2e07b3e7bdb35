"""Variant sweep for the BLASST decode kernel (H200): K ring depth x resident warps, or a
modified copy of the kernel module against the committed one.

For each cell of ``workloads.peaked_decode_batch`` (d 128, bf16) it times -- interleaved
round by round on the same cache, so drift hits all alike -- vLLM's FA3 and every kernel
variant dense and at the factors calibrated to ~0.7 / 0.9 skipped tiles. All variants
use the heuristic's split shape, so they take the same skip decisions (a module copy from
before long splits, ``4349a65``, can run only a cell whose shape has equal splits; the
script says so and stops otherwise); variants that accumulate
in the same order give bit-identical outputs, and the script reports, per variant,
whether its output equals the first variant's. ``--module NAME=PATH`` (repeatable) adds another copy of the kernel
module (e.g. an older commit's ``blasst_decode.py``, or an edited one) as variant ``NAME``, run with the default
ring depth and warps; ``--baseline-module PATH`` is ``--module baseline=PATH``. Writes JSON to ``--out``.

    cd benchmarks && python decode_variants.py --out $OUT/decode_variants.json \\
        --variants k2:w8 k3:w8 --baseline-module /path/to/other/blasst_decode.py
"""

import argparse
import importlib.util
import inspect
import json
import re
import time

import torch

from vllm_blackwell_sparse import workloads
from vllm_blackwell_sparse.bench.decode import calibrate_factors, interleaved_medians, speedup_bar, vllm_fa_decode
from vllm_blackwell_sparse.bench.topk import environment
from vllm_blackwell_sparse.kernels import blasst_decode as bd

# (batch, context, num_q_heads, page)
CELLS = [(8, 32768, 32, 16), (8, 65536, 32, 16), (8, 32768, 32, 64), (32, 32768, 32, 16), (32, 32768, 64, 64),
         (64, 32768, 32, 16), (32, 131072, 32, 16)]


def parse_variant(spec: str) -> dict:
    """``kK:wW`` -> k_stages K, min_warps_per_sm W."""
    m = re.fullmatch(r"k(\d+):w(\d+)", spec)
    if not m:
        raise SystemExit(f"--variants: expected kK:wW (e.g. k2:w8), got {spec!r}")
    return {"k_stages": int(m[1]), "min_warps_per_sm": int(m[2])}


def load_module(path: str, name: str = "baseline"):
    """Import a copy of ``blasst_decode.py`` from ``path`` (its own compile cache)."""
    spec = importlib.util.spec_from_file_location(f"{name}_blasst_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cell_inputs(batch: int, ctx: int, hq: int, page: int, hkv: int = 8, d: int = 128):
    """One cell's ``workloads.peaked_decode_batch`` (d 128, bf16) with what every decode
    script times it with: the workload dict, its q / caches / block table / lengths, the
    softmax scale, the heuristic's split shape (``bd.SplitShape``), a workspace for it and
    zeroed skip counters."""
    w = workloads.peaked_decode_batch(batch, ctx, hq, hkv, d, page, device="cuda")
    q, kc, vc, table, lens = (w[k] for k in ("q", "k_cache", "v_cache", "block_table", "seq_lens"))
    shape = bd.split_shape_heuristic(batch, hkv, hq // hkv, ctx, q.device)
    ws = bd.decode_workspace(shape.num_splits, batch, hq, d, q.device)
    counts = torch.zeros(batch, 2, dtype=torch.int32, device="cuda")
    return w, q, kc, vc, table, lens, d ** -0.5, shape, ws, counts


def module_shape_kwargs(mod, shape: dict) -> dict:
    """``shape`` (``bd.SplitShape._asdict()``) as ``mod.blasst_decode`` keyword arguments: a
    module copy from before long splits takes ``num_splits`` alone, so only equal splits."""
    if "long_splits" in inspect.signature(mod.blasst_decode).parameters:
        return dict(shape)
    if shape.get("long_splits", 0) == 0:
        return {"num_splits": shape["num_splits"]}
    raise SystemExit(f"{mod.__file__} predates long splits (its blasst_decode has no long_splits) and cannot "
                     f"run the split shape {shape}")


def variant_runner(variants: dict, outs: dict, q, kc, vc, table, lens, scale, ws, counts, shape: dict | None = None):
    """``run(name, factor, count=False)``: variant ``name`` (``variants[name] = (module,
    kwargs)``) on one cell's inputs into ``outs[name]``, with the split ``shape`` for every
    variant (:func:`module_shape_kwargs`) or, without it, the variant's own kwargs only;
    ``count``: its skip counters zeroed into ``counts``. The closure holds the cell's cache:
    drop it before the next cell's inputs are built."""
    shaped = {name: module_shape_kwargs(mod, shape) if shape else {} for name, (mod, _) in variants.items()}

    def run(name, factor, count=False):
        mod, kw = variants[name]
        if count:
            counts.zero_()
        return mod.blasst_decode(q, kc, vc, table, lens, softmax_scale=scale, threshold_scale_factor=factor,
                                 out=outs[name], workspace=ws, skip_counts=counts if count else None,
                                 **shaped[name], **kw)
    return run


def sparsity_columns(times: dict, fa3: float, name: str, reached) -> str:
    """`` | sS US xSPEEDUP (bar BAR)`` for each ``(target, sparsity reached)`` of ``reached``,
    from the ``times`` keys ``"s{target}|{name}"``, speedups over ``fa3`` µs."""
    line = ""
    for target, got in reached:
        t = times[f"s{target}|{name}"]
        line += f" | s{got:.3f} {t:.1f} x{fa3 / t:.3f} (bar {speedup_bar(got):.3f})"
    return line


def save_and_release(path: str, res: dict, *containers):
    """Write ``res`` as JSON and drop one cell's GPU tensors held by ``containers`` (dicts
    of outputs, of timed closures) so the next cell's cache fits."""
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    for c in containers:
        c.clear()
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cells", nargs="+", default=None, help="BATCHxCONTEXTxHQxPAGE (default: CELLS)")
    ap.add_argument("--variants", nargs="*", default=["k2:w8", "k3:w8"])
    ap.add_argument("--baseline-module", default=None)
    ap.add_argument("--module", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.7, 0.9])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    cells = [tuple(int(x) for x in c.split("x")) for c in a.cells] if a.cells else CELLS
    variants = {}
    modules = [f"baseline={a.baseline_module}"] * bool(a.baseline_module) + a.module
    for spec in modules:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--module: expected NAME=PATH, got {spec!r}")
        if name in variants:
            raise SystemExit(f"--module: variant name {name!r} given twice")
        variants[name] = (load_module(path, name), {})
    for spec in a.variants:
        if spec in variants:
            raise SystemExit(f"--variants: {spec!r} given twice")
        variants[spec] = (bd, parse_variant(spec))
    if not variants:
        raise SystemExit("nothing to time: give --variants and/or --module / --baseline-module")
    hkv, d = 8, 128
    res = {"environment": environment(), "args": vars(a), "cells": []}
    for batch, ctx, hq, page in cells:
        t0 = time.time()
        w, q, kc, vc, table, lens, scale, shape, ws, counts = cell_inputs(batch, ctx, hq, page, hkv, d)
        outs = {name: torch.empty_like(q) for name in variants}
        run = variant_runner(variants, outs, q, kc, vc, table, lens, scale, ws, counts, shape._asdict())

        first = next(iter(variants))

        factors = calibrate_factors(lambda f: run(first, f, count=True), counts, a.sparsities, float(ctx))
        fa3_out = torch.empty_like(q)
        fns = {"fa3": vllm_fa_decode(w, fa3_out, 3, ctx)}
        checks = {}
        fns["fa3"]()
        ref = fa3_out.float().clone()
        for label, factor in [("dense", None)] + [(f"s{sp}", f) for sp, (f, _) in factors.items()]:
            run(first, factor)
            want = outs[first].clone()
            checks[f"{label}_max_err_vs_fa3"] = (want.float() - ref).abs().max().item()
            for name in variants:
                fns[f"{label}|{name}"] = (lambda n=name, f=factor: run(n, f))
                if name != first:
                    run(name, factor)
                    checks[f"{label}|{name}_bit_identical"] = bool(torch.equal(outs[name], want))
        times = interleaved_medians(fns, a.rounds, a.warmup)
        kv_bytes = batch * ctx * hkv * d * 2
        cell = {"batch": batch, "context": ctx, "num_q_heads": hq, "num_kv_heads": hkv, "page": page, "splits": shape._asdict(),
                "factors": {str(k): {"factor": v[0], "sparsity": v[1]} for k, v in factors.items()},
                "us": times, "checks": checks, "kv_bytes_one_plane": kv_bytes}
        res["cells"].append(cell)
        fa3 = times["fa3"]
        bad = [k for k, v in checks.items() if v is False]
        print(f"B{batch} {ctx // 1024}K {hq}/{hkv} p{page} {shape} fa3 {fa3:.0f} [{time.time() - t0:.0f}s]"
              + (f" NOT IDENTICAL: {bad}" if bad else " outputs identical"), flush=True)
        for name in variants:
            line = f"  {name:>12}: dense {times[f'dense|{name}']:.0f} (x{fa3 / times[f'dense|{name}']:.3f})"
            print(line + sparsity_columns(times, fa3, name, [(sp, got) for sp, (_, got) in factors.items()]), flush=True)
        w = q = kc = vc = ws = ref = run = None  # run's closure holds the cache, and so do fns
        save_and_release(a.out, res, outs, fns)


if __name__ == "__main__":
    main()
