"""Issue 27's findings replayed on 0.7.0's BLASST decode kernel (commit a8192f3), to show
that the tests which guard them fail there: a graph sized for 128K keys against an eager
call, one request beside different neighbours, and NaN / Inf in slots past seq_len.

    python tests/gpu/findings_on_070.py --module .baseline/blasst_decode_a8192f3.py --out $OUT/findings_070.json

Not collected by pytest (the module is a file of an older commit, carried to the host).
Each check prints whether 0.7.0 holds it; the current kernel passes the same checks in
tests/gpu/test_blasst_decode.py.
"""

import argparse
import importlib.util
import json
import random
import sys

import torch

from vllm_blackwell_sparse import workloads as wl
from vllm_blackwell_sparse.bench.topk import environment

DEV = "cuda"


def load(path):
    spec = importlib.util.spec_from_file_location("blasst_decode_070", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def graph_vs_eager(bd, factor=8.0):
    b, hq, hkv, d, bs = 3, 32, 8, 128, 16
    case = wl.peaked_attention_case([2048, 1999, 1500], [1] * b, hq, hkv, d, bs, device=DEV,
                                    params=wl.PeakedAttentionParams(seed=random.randrange(1 << 30)))
    q, kc, vc, table, lens = (case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens"))
    wide = torch.zeros(b, 131072 // bs, dtype=torch.int32, device=DEV)
    wide[:, :table.shape[1]] = table
    counts_g = torch.zeros(b, 2, dtype=torch.int32, device=DEV)
    out_g = bd.blasst_decode(q, kc, vc, wide, lens, softmax_scale=d ** -0.5, threshold_scale_factor=factor,
                             max_seq_len=131072, skip_counts=counts_g)  # the shape a 128K capture replays
    counts_e = torch.zeros(b, 2, dtype=torch.int32, device=DEV)
    out_e = bd.blasst_decode(q, kc, vc, table, lens, softmax_scale=d ** -0.5, threshold_scale_factor=factor,
                             max_seq_len=int(lens.max()), skip_counts=counts_e)
    return {"same_bits": bool(torch.equal(out_g, out_e)), "same_counts": bool(torch.equal(counts_g, counts_e)),
            "counts_128k_shape": counts_g.tolist(), "counts_eager": counts_e.tolist(),
            "max_abs_diff": float((out_g.float() - out_e.float()).abs().max())}


def neighbours(bd):
    hq, hkv, d, bs = 32, 8, 128, 16
    lens_list = [3000, 60000] + [20000] * 30
    case = wl.peaked_attention_case(lens_list, [1] * len(lens_list), hq, hkv, d, bs, device=DEV,
                                    params=wl.PeakedAttentionParams(seed=random.randrange(1 << 30)))
    q, kc, vc, table, lens = (case[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens"))
    res = []
    for n in (1, 2, len(lens_list)):
        counts = torch.zeros(n, 2, dtype=torch.int32, device=DEV)
        out = bd.blasst_decode(q[:n], kc, vc, table[:n], lens[:n], softmax_scale=d ** -0.5, threshold_scale_factor=6.0,
                               max_seq_len=int(lens[:n].max()), skip_counts=counts)
        res.append((out[:1].clone(), counts[:1].clone()))
    return {"same_bits": all(torch.equal(o, res[0][0]) for o, _ in res[1:]),
            "same_counts": all(torch.equal(c, res[0][1]) for _, c in res[1:]),
            "request0_counts_alone_pair_32": [c[0].tolist() for _, c in res]}


def poisoned(bd, poison):
    hq, hkv, d, bs = 32, 8, 128, 16
    lens_list = [16 * 40 + 5, 16 * 200 + 5, 16 * 3 + 5]
    case = wl.peaked_attention_case(lens_list, [1] * 3, hq, hkv, d, bs, device=DEV,
                                    params=wl.PeakedAttentionParams(seed=random.randrange(1 << 30)))
    kc, vc = case["k_cache"].clone(), case["v_cache"].clone()
    for cache in (kc, vc):
        for b, n in enumerate(case["seq_lens"].tolist()):
            cache[case["block_table"][b, n // bs], n % bs:] = poison
    out = bd.blasst_decode(case["q"], kc, vc, case["block_table"], case["seq_lens"], softmax_scale=d ** -0.5,
                           threshold_scale_factor=6.0)
    return {"finite": bool(torch.isfinite(out).all()), "non_finite_values": int((~torch.isfinite(out)).sum())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--module", required=True, help="kernels/blasst_decode.py of the commit to check")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    bd = load(a.module)
    result = {"environment": environment(), "command": " ".join(sys.argv), "module": a.module, "checks": {}}
    checks = {"graph_128k_vs_eager": lambda: graph_vs_eager(bd), "neighbours": lambda: neighbours(bd),
              "poison_nan": lambda: poisoned(bd, float("nan")), "poison_inf": lambda: poisoned(bd, float("inf"))}
    for name, fn in checks.items():
        try:
            result["checks"][name] = fn()
        except Exception as e:  # an older API may refuse a call: that is a result too
            result["checks"][name] = {"error": f"{type(e).__name__}: {e}"}
        print(name, json.dumps(result["checks"][name]), flush=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
