"""Where the host time of one ``blasst_decode`` call goes (what an eager step pays per layer
and what every mixed prefill+decode batch pays, attention running outside the graphs).

    python benchmarks/decode_call_overhead.py --out $OUT/call_overhead.json

Each row is the median over 5 rounds of the host time of one call, launches queued
without waiting: the whole wrapper; the wrapper with the two DSL launches replaced by
no-ops (Python: the signature key, the cache lookup, the alignment checks, allocation);
each compiled DSL function called alone with prepared arguments (the TVM-FFI call);
FA3's ``flash_attn_varlen_func`` on the same cache for scale. Cells: the SmolLM2 shape
(9 q / 3 kv heads, d 64, page 128) at batch 8 and 64, with and without ``out`` and
``workspace`` given (the backend gives ``out``; without ``workspace`` the wrapper
allocates it per call).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_peers import host_us_per_call  # noqa: E402

from vllm_blackwell_sparse import workloads  # noqa: E402
from vllm_blackwell_sparse.bench.topk import environment  # noqa: E402
from vllm_blackwell_sparse.kernels import blasst_decode as bd  # noqa: E402
from vllm_blackwell_sparse.kernels.blasst_decode import launch as bd_launch  # noqa: E402


def cell(batch, ctx, hq, hkv, d, page, factor):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    w = workloads.peaked_decode_batch(batch, ctx, hq, hkv, d, page, device="cuda",
                                      params=workloads.PeakedAttentionParams(seed=batch + ctx))
    q, kc, vc, table, lens = w["q"], w["k_cache"], w["v_cache"], w["block_table"], w["seq_lens"]
    scale = d ** -0.5
    out = torch.empty_like(q)
    grid = bd.DEFAULT_SPLIT_RULE.max_split_count(-(-ctx // bd.KV_TILE))
    ws = bd.decode_workspace(grid, q.shape[0], hq, d, q.device)

    def ours(out_=None, ws_=None):
        return bd.blasst_decode(q, kc, vc, table, lens, softmax_scale=scale, threshold_scale_factor=factor,
                                next_n=1, max_seq_len=ctx, out=out_, workspace=ws_)

    rows = {"wrapper (out, workspace given)": host_us_per_call(lambda: ours(out, ws)),
            "wrapper (out given, workspace allocated)": host_us_per_call(lambda: ours(out, None)),
            "wrapper (nothing given)": host_us_per_call(lambda: ours())}
    ours(out, ws)
    launch = next(v for k, v in bd_launch._LAUNCHES.items() if k[0] == bd_launch._meta(q) and k[5] == bd_launch._meta(out)
                  and k[6] is not None and k[9] == (factor is None))
    dec, comb = launch.decode, launch.combine
    o_part, lse_part = ws
    log2_factor = 0.0 if factor is None else float(torch.tensor(factor).log2())
    dec_args = (q, kc, vc, table, lens, out, o_part, lse_part, lens, lens.view(1, 1, -1), lse_part.view(-1),
                scale * bd.LOG2E,
                log2_factor, launch.grid_splits, launch.long_splits, launch.long_split_ratio,
                launch.rule_min_tiles, launch.rule_target_splits)
    rows["DSL decode launch alone"] = host_us_per_call(lambda: dec(*dec_args))
    if comb is not None:
        comb_args = (o_part[:launch.grid_splits], lse_part[:launch.grid_splits], out, lens, launch.next_n,
                     launch.rule_min_tiles, launch.rule_target_splits)
        rows["DSL combine launch alone"] = host_us_per_call(lambda: comb(*comb_args))
        rows["workspace slicing (two views)"] = host_us_per_call(lambda: (o_part[:launch.grid_splits],
                                                                          lse_part[:launch.grid_splits]))
    try:
        launch.decode, launch.combine = (lambda *a: None), ((lambda *a: None) if comb is not None else None)
        rows["wrapper without the launches (out, workspace given)"] = host_us_per_call(lambda: ours(out, ws))
        rows["wrapper without the launches (out given)"] = host_us_per_call(lambda: ours(out, None))
    finally:
        launch.decode, launch.combine = dec, comb
    rows["signature key (_meta of every tensor)"] = host_us_per_call(
        lambda: tuple(bd_launch._meta(t) for t in (q, kc, vc, table, lens, out, ws[0], ws[1], None, None)))
    rows["decode_workspace allocation"] = host_us_per_call(lambda: bd.decode_workspace(grid, q.shape[0], hq, d,
                                                                                        q.device))
    cu = w["cu_seqlens_q"]
    rows["FA3 flash_attn_varlen_func (for scale)"] = host_us_per_call(lambda: flash_attn_varlen_func(
        q=q, k=kc, v=vc, out=out, cu_seqlens_q=cu, max_seqlen_q=1, seqused_k=lens, max_seqlen_k=ctx,
        softmax_scale=scale, causal=True, block_table=table, fa_version=3, num_splits=0))
    return {"batch": batch, "ctx": ctx, "hq": hq, "hkv": hkv, "d": d, "page": page, "factor": factor,
            "grid_splits": launch.grid_splits, "host_us": rows}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/blasst_decode_call_overhead.json")
    a = p.parse_args()
    cells = []
    for batch in (8, 64):
        for factor in (None, 64.0):
            c = cell(batch, 7000, 9, 3, 64, 128, factor)
            cells.append(c)
            print(json.dumps(c), flush=True)
            Path(a.out).write_text(json.dumps({"environment": environment(), "command": " ".join(sys.argv),
                                               "cells": cells}, indent=1))
    for c in cells:
        print(f"\nB{c['batch']} x {c['ctx']} factor {c['factor']}:")
        for k, v in c["host_us"].items():
            print(f"  {v:8.1f} us  {k}")


if __name__ == "__main__":
    main()
