"""GVR inside vLLM's DSA indexer, end to end on the tiny DeepSeek-V3.2 (dummy weights).

The same generation runs with ``gvr_topk`` on and off, each in a fresh process: 40
requests of 2.2K-12K tokens (k = 2048, so top-k selects) and 6-40 greedy tokens, at
most 32 running, so requests finish and waiting ones arrive while others decode.
Greedy tokens must be identical. vLLM's kernels break ties at the cutoff in arrival
order while GVR keeps lower indices, so identical tokens are only owed when no row has
a tie at the k-th value: the GVR run counts such rows on the GPU and the test requires
zero (it compares exact sets, not sets modulo ties).

The hint state must carry over between steps: the GVR run counts, per layer, rows
whose hint is their own request's previous decode step (checked on the GPU against the
sequence length stored with the hint). A request's first decode step has no hint yet,
so the expected hit rate is below 1 (about 0.95 for this workload).
"""

import json
import os
from pathlib import Path

import pytest

from vllm_blackwell_sparse.bench.dsa import TINY_DSA_DIR, DsaRunSpec, compare_tokens, run_subprocess


def _deep_gemm_missing():
    try:
        from vllm.utils.deep_gemm import has_deep_gemm

        return None if has_deep_gemm() else "DeepGEMM is not available (vLLM's DSA indexer needs it)"
    except Exception as e:  # noqa: BLE001
        return f"checking DeepGEMM failed: {e}"


def _artifact(name, data):
    d = os.environ.get("VBS_TEST_ARTIFACTS")
    if d:
        Path(d).mkdir(parents=True, exist_ok=True)
        Path(d, name).write_text(json.dumps(data, indent=1))


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda_graphs", "eager"])
def test_gvr_gives_identical_tokens_and_carries_hints(enforce_eager):
    why = _deep_gemm_missing()
    if why:
        pytest.skip(why)
    assert (TINY_DSA_DIR / "config.json").exists()
    ours = run_subprocess(DsaRunSpec(gvr=True, stats=True, enforce_eager=enforce_eager))
    ref = run_subprocess(DsaRunSpec(gvr=False, enforce_eager=enforce_eager))
    cmp = compare_tokens(ours["tokens"], ref["tokens"])
    stats = ours["gvr_stats"]
    summary = {
        "enforce_eager": enforce_eager,
        "comparison": cmp,
        "gvr_layers": ours["gvr_layers"],
        "gvr_stats": stats,
        "prompt_lens": ours["prompt_lens"],
        "init_seconds": {"gvr": ours["init_seconds"], "vllm": ref["init_seconds"]},
        "generation_seconds": {"gvr": ours["generation_seconds"], "vllm": ref["generation_seconds"]},
    }
    _artifact(f"dsa_gvr_{'eager' if enforce_eager else 'graphs'}.json", summary)
    print(json.dumps(summary, indent=1))

    assert ref["gvr_layers"] == [], "gvr_topk off must leave vLLM's indexer alone"
    assert len(ours["gvr_layers"]) == 2, ours["gvr_layers"]  # the tiny model's two DSA layers
    assert set(stats) == set(ours["gvr_layers"])
    for name, s in stats.items():
        assert s["rows"] > 500, (name, s)  # decode rows really went through GVR
        assert s["cutoff_ties"] == 0, f"{name}: rows with a tie at the cutoff make the token comparison moot: {s}"
        assert 0.85 <= s["hit_rate"] <= 1.0, (name, s)
    assert cmp["tokens"] == sum(len(t) for t in ref["tokens"]) > 0
    assert cmp["identical"], cmp
