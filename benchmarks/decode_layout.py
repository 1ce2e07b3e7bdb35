"""Paged-cache layout experiment for BLASST decode (H200): token-major (NHD) vs head-major (HND) pages.

Hypothesis: with NHD pages one KV head's 16-key tile is 16 separate 256-byte rows 2 KiB
apart (d 128, 8 KV heads), and a skipped tile leaves holes in every DRAM row it touches;
with HND pages the tile is 4 KiB of contiguous bytes, so sparse V reads stay whole.

For each cell it builds one ``workloads.peaked_decode_batch`` cache, a copy with the same
values in the other layout, and times -- interleaved round by round, so drift hits all
alike -- FA3 and FA4 (vLLM's ``flash_attn_varlen_func``) and our kernel dense and at the
factors calibrated to ~0.7 / 0.9 skipped tiles, on both layouts. Outputs on the two
layouts must be equal (same values, same order of arithmetic). Writes JSON to ``--out``.

    python benchmarks/decode_layout.py --out $OUT/decode_layout.json
"""

import argparse
import json
import time

import torch

from vllm_blackwell_sparse import workloads
from vllm_blackwell_sparse.bench.decode import calibrate_factors, interleaved_medians, speedup_bar, vllm_fa_decode
from vllm_blackwell_sparse.bench.topk import environment
from vllm_blackwell_sparse.kernels import blasst_decode as bd

# (batch, context, num_q_heads, page)
CELLS = [(8, 32768, 32, 16), (8, 65536, 32, 16), (8, 32768, 32, 64), (32, 32768, 32, 16), (32, 32768, 64, 64),
         (64, 32768, 32, 16), (32, 131072, 32, 16)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cells", nargs="+", default=None, help="BATCHxCONTEXTxHQxPAGE (default: CELLS)")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.7, 0.9])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    cells = [tuple(int(x) for x in c.split("x")) for c in a.cells] if a.cells else CELLS
    hkv, d = 8, 128
    res = {"environment": environment(), "args": vars(a), "cells": []}
    for batch, ctx, hq, page in cells:
        t0 = time.time()
        w = workloads.peaked_decode_batch(batch, ctx, hq, hkv, d, page, device="cuda")
        caches = {"NHD": (w["k_cache"], w["v_cache"])}
        caches["HND"] = tuple(workloads.to_kv_layout(c, "HND") for c in caches["NHD"])
        q, table, lens = w["q"], w["block_table"], w["seq_lens"]
        scale = d ** -0.5
        shape = bd.split_shape_heuristic(batch, hkv, hq // hkv, ctx, q.device)
        ws = bd.decode_workspace(shape.num_splits, batch, hq, d, q.device)
        counts = torch.zeros(batch, 2, dtype=torch.int32, device="cuda")
        # Outputs allocated once, outside the timed calls.
        outs = {(name, lay): torch.empty_like(q) for name in ("ours", "fa3", "fa4") for lay in ("NHD", "HND")}

        def ours(layout, factor, ks, count=False):
            kc, vc = caches[layout]
            if count:
                counts.zero_()
            o = outs[("ours", layout)]
            return bd.blasst_decode(q, kc, vc, table, lens, softmax_scale=scale, threshold_scale_factor=factor,
                                    out=o, workspace=ws, skip_counts=counts if count else None, **shape._asdict(),
                                    k_stages=ks)

        factors = calibrate_factors(lambda f: ours("NHD", f, 2, count=True), counts, a.sparsities, float(ctx))
        fns, errors = {}, {}
        for layout in ("NHD", "HND"):
            for ver in (3, 4):
                o = outs[(f"fa{ver}", layout)]
                lw = dict(w, k_cache=caches[layout][0], v_cache=caches[layout][1])
                fn = vllm_fa_decode(lw, o, ver, ctx)
                try:
                    fn()
                    torch.cuda.synchronize()
                    fns[f"fa{ver}_{layout}"] = fn
                except Exception as e:  # noqa: BLE001 - recorded, the rest still runs
                    errors[f"fa{ver}_{layout}"] = f"{type(e).__name__}: {str(e)[:200]}"
            for ks in a.stages:
                fns[f"dense_k{ks}_{layout}"] = (lambda lay=layout, k=ks: ours(lay, None, k))
                for sp, (f, _) in factors.items():
                    fns[f"s{sp}_k{ks}_{layout}"] = (lambda lay=layout, k=ks, fac=f: ours(lay, fac, k))
        # Equality across layouts (dense FA3 and ours at every factor).
        checks = {}
        for ver in (3,):
            if f"fa{ver}_NHD" in fns and f"fa{ver}_HND" in fns:
                checks[f"fa{ver}_max_diff"] = (outs[(f"fa{ver}", "NHD")].float() - outs[(f"fa{ver}", "HND")].float()).abs().max().item()
        if "fa3_NHD" not in fns:
            raise SystemExit(f"FA3 failed on this cell, nothing to compare against: {errors}")
        fns["fa3_NHD"]()
        ref = outs[("fa3", "NHD")].float().clone()
        for sp, (f, _) in [(None, (None, None))] + list(factors.items()):
            got = {}
            for layout in ("NHD", "HND"):
                ours(layout, f, 2)
                got[layout] = outs[("ours", layout)].float().clone()
            checks[f"ours_{sp}_layout_max_diff"] = (got["NHD"] - got["HND"]).abs().max().item()
            checks[f"ours_{sp}_vs_fa3_max_err"] = (got["NHD"] - ref).abs().max().item()
        times = interleaved_medians(fns, a.rounds, a.warmup)
        kv_bytes = batch * ctx * hkv * d * 2
        cell = {"batch": batch, "context": ctx, "num_q_heads": hq, "num_kv_heads": hkv, "page": page, "splits": shape._asdict(),
                "factors": {str(k): {"factor": v[0], "sparsity": v[1]} for k, v in factors.items()},
                "us": times, "errors": errors, "checks": checks, "kv_bytes_one_plane": kv_bytes}
        res["cells"].append(cell)
        best = {lay: min(times[k] for k in (f"fa3_{lay}", f"fa4_{lay}") if k in times) for lay in ("NHD", "HND")}
        print(f"B{batch} {ctx // 1024}K {hq}/{hkv} p{page} {shape} [{time.time() - t0:.0f}s] errors {errors} checks "
              + " ".join(f"{k}={v:.3g}" for k, v in checks.items()), flush=True)
        for lay in ("NHD", "HND"):
            line = f"  {lay}: fa3 {times.get(f'fa3_{lay}', float('nan')):.0f} fa4 {times.get(f'fa4_{lay}', float('nan')):.0f}"
            for ks in a.stages:
                line += f" | k{ks} dense {times[f'dense_k{ks}_{lay}']:.0f} (x{best[lay] / times[f'dense_k{ks}_{lay}']:.2f})"
                for sp, (_, got) in factors.items():
                    t = times[f"s{sp}_k{ks}_{lay}"]
                    line += (f" s{got:.2f} {t:.0f} x{best[lay] / t:.2f} / xNHDbest {best['NHD'] / t:.2f}"
                             f" (bar {speedup_bar(got):.3f}, {kv_bytes * (2 - got) / t / 1e6:.2f}TB/s)")
            print(line, flush=True)
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)
        w = caches = q = ws = ref = lw = None
        outs.clear()
        fns.clear()  # their closures hold the caches
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
