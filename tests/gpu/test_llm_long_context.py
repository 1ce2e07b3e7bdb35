"""CUSTOM dense against vLLM's FLASH_ATTN (FA3 on the H200) at 64K-128K keys, batch 8,
under full decode CUDA graphs: our builder plans FA3's schedule the way vLLM's own does
(scheduler metadata, at most 32 splits), so both run the same kernels with the same
plan; greedy tokens and their logprobs compared (tiny dummy-weight Llama, positions
extended to 131072)."""

import json
import os
from pathlib import Path

from vllm_blackwell_sparse.demo import GenerationSpec, run_generation_subprocess, token_agreement

LENGTHS = [131000, 100000, 65536, 65536, 70000, 80000, 90000, 120000]


def test_custom_dense_equals_flash_attn_at_long_context():
    common = dict(
        prompt_lengths=LENGTHS, max_tokens=16, logprobs=1, max_model_len=131072 + 64, gpu_memory_utilization=0.3,
        extra_llm_kwargs={
            "hf_overrides": {"max_position_embeddings": 131072 + 64}, "max_num_seqs": 8,
            "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": [8]},
        },
    )
    ours = run_generation_subprocess(GenerationSpec(backend="CUSTOM", **common), timeout=1200)
    ref = run_generation_subprocess(GenerationSpec(backend="FLASH_ATTN", **common), timeout=1200)
    agree = token_agreement(ours["tokens"], ref["tokens"])
    diffs = []
    for a, b, ta, tb in zip(ours["logprobs"], ref["logprobs"], ours["tokens"], ref["tokens"]):
        for la, lb, xa, xb in zip(a, b, ta, tb):
            if xa != xb:
                break
            diffs.append(abs(la - lb))
    summary = {"agreement": agree, "max_abs_logprob_diff": max(diffs), "compared_tokens": len(diffs),
               "ours_impl": ours["attention_backend_class"], "ref_impl": ref["attention_backend_class"]}
    if os.environ.get("VBS_TEST_ARTIFACTS"):
        Path(os.environ["VBS_TEST_ARTIFACTS"], "llm_long_context_custom_vs_flash_attn.json").write_text(
            json.dumps(summary, indent=1))
    print(summary)
    assert ours["attention_backend_class"] == "BlackwellSparseImpl"
    assert agree >= 0.95, summary
    assert max(diffs) < 0.05, summary
