"""Modified copies of the GVR top-k kernel module against the installed one (H200), in one run.

For each (rows, width) cell of the middle-layer DSA trace (``workloads.dsa_decode_trace``,
true hint), it checks every module's default choice (``gvr_topk`` without tuning
arguments; ``current`` is the installed package's) and vLLM's choice against
torch.topk, then times them hot and cold (``bench.topk.time_kernel``), in two
alternating rounds whose medians are averaged. Writes JSON to ``--out``.

    cd benchmarks && python topk_variants.py --module old=/path/to/old/gvr_topk.py --out $OUT/topk_variants.json
"""

import argparse
import importlib.util
import json

import torch

from vllm_blackwell_sparse.bench.topk import environment, inexact_reason, time_kernel, topk_kernels
from vllm_blackwell_sparse.kernels import gvr_topk as current
from vllm_blackwell_sparse.workloads import DSA_TRACE_PRESETS, DsaTraceParams, dsa_decode_trace, topk_overlap

CELLS = [(1, 65536), (1, 131072), (8, 131072), (32, 65536), (32, 131072), (64, 65536), (64, 131072), (16, 32768),
         (128, 131072)]


def trace_cell(rows: int, n: int, k: int, params: DsaTraceParams):
    """One cell of the DSA trace: the current step's logits ``src`` ``[rows, n]``, lengths
    ``[rows, 1]``, the true hint (the previous step's top-k, int32), torch.topk of ``src``
    and its sorted values (what every kernel's result is checked against)."""
    prev, cur = dsa_decode_trace(rows, n, 2, params, device="cuda")
    src = cur.contiguous()
    lens = torch.full((rows, 1), n, dtype=torch.int32, device="cuda")
    hint = torch.topk(prev, k, dim=1).indices.int().contiguous()
    top = torch.topk(src, k, dim=1)
    return src, lens, hint, top, torch.sort(top.values, 1).values


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--module", action="append", default=[], metavar="NAME=PATH",
                    help="a gvr_topk.py copy to time as NAME (repeatable)")
    ap.add_argument("--cells", nargs="+", default=None, help="ROWSxWIDTH (default: CELLS)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    a = ap.parse_args()
    modules = {"current": current}
    for item in a.module:
        name, _, path = item.partition("=")
        spec = importlib.util.spec_from_file_location(f"gvr_topk_{name}", path)
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    cells = [tuple(int(v) for v in c.split("x")) for c in a.cells] if a.cells else CELLS
    k = 2048
    params = DsaTraceParams(query_drift=DSA_TRACE_PRESETS["middle_layers"])
    res = {"environment": environment(), "args": vars(a), "trace": params.__dict__, "cells": []}
    for rows, n in cells:
        src, lens, hint, top, want = trace_cell(rows, n, k, params)
        fns = {name: (lambda x, ln, o, m=mod: m.gvr_topk(x, ln, k, hint=hint, out=o)) for name, mod in modules.items()}
        fns["vllm_choice"] = topk_kernels(rows, k)["vllm_choice"]
        x = torch.empty_like(src)
        cell = {"rows": rows, "n": n, "overlap": topk_overlap(hint.long(), top.indices), "exact": {}, "us": {}}
        for name, fn in fns.items():
            out = torch.full((rows, k), -1, dtype=torch.int32, device="cuda")
            x.copy_(src)
            fn(x, lens, out)
            torch.cuda.synchronize()
            cell["exact"][name] = inexact_reason(src, out, k, want) or True
        for l2 in ("hot", "cold"):
            runs = {name: [] for name in fns}
            for _ in range(2):
                for name, fn in fns.items():
                    out = torch.empty((rows, k), dtype=torch.int32, device="cuda")
                    runs[name].append(time_kernel(fn, x, src, lens, out, l2=l2, iters=a.iters, warmup=a.warmup))
            cell["us"][l2] = {name: sum(v) / len(v) for name, v in runs.items()}
        res["cells"].append(cell)
        line = f"B{rows} N{n // 1024}K overlap {cell['overlap']:.2f} exact {cell['exact']}"
        for l2, t in cell["us"].items():
            line += f" | {l2}: vllm {t['vllm_choice']:.1f} " + " ".join(
                f"{name} {t[name]:.1f} (x{t['vllm_choice'] / t[name]:.2f})" for name in modules)
        print(line, flush=True)
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
