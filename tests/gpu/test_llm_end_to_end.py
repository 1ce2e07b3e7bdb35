"""Offline LLM() on the embedded tiny Llama: CUSTOM gives the same greedy tokens as
vLLM's FLASH_ATTN forced to the FlashAttention version our dense path runs on this GPU
(FA3 on sm90, FA4 on sm100: the same kernels), with vLLM's default CUDA graphs, chunked
prefill and mixed prefill/decode batches."""

import json
import os
from pathlib import Path

from vllm_blackwell_sparse.demo import GenerationSpec, run_generation_subprocess, token_agreement


def _artifact(name, data):
    d = os.environ.get("VBS_TEST_ARTIFACTS")
    if d:
        Path(d).mkdir(parents=True, exist_ok=True)
        Path(d, name).write_text(json.dumps(data, indent=1))


def test_custom_equals_flash_attn_greedy_tokens():
    from vllm_blackwell_sparse.backend import dense_fa_version

    fa_version = dense_fa_version()  # what our dense path runs here (FA3 on sm90)
    # 8 prompts of 1500 tokens through 2048-token batches: prefills are chunked and mixed with decodes.
    common = dict(num_prompts=8, prompt_tokens=1500, max_tokens=48, extra_llm_kwargs={"max_num_batched_tokens": 2048})
    ours = run_generation_subprocess(GenerationSpec(backend="CUSTOM", **common))
    ref = run_generation_subprocess(GenerationSpec(backend="FLASH_ATTN", flash_attn_version=fa_version, **common))
    summary = {
        "flash_attn_version": fa_version, "ours_impl": ours["attention_backend_class"], "ref_impl": ref["attention_backend_class"],
        "agreement": token_agreement(ours["tokens"], ref["tokens"]),
        "ours_tokens_per_s": ours["tokens_per_s"], "ref_tokens_per_s": ref["tokens_per_s"],
        "generated_tokens": ours["generated_tokens"], "sample_text": ours["sample_text"],
    }
    _artifact(f"llm_custom_vs_fa{fa_version}.json", summary)
    print(summary)
    assert ours["attention_backend_class"] == "BlackwellSparseImpl"
    assert ref["attention_backend_class"] == "FlashAttentionImpl"
    assert ours["generated_tokens"] == 8 * 48
    assert ours["tokens"] == ref["tokens"]
    assert ours["sample_text"].strip(), "the tiny tokenizer should detokenise the output"


def test_blasst_decode_in_llm_matches_dense_at_a_negligible_threshold():
    """CUSTOM with decode_threshold_scale_factor set runs decode rows through the BLASST
    kernel (CUDA graphs, mixed batches). At factor 1e-4 (λ ≈ 1e-7: only tiles whose
    weight is below e^-16 of the running max may be skipped) the greedy tokens should
    match dense attention (FA3 on sm90) up to the kernels' different bf16 rounding."""
    common = dict(num_prompts=8, prompt_tokens=1500, max_tokens=48, extra_llm_kwargs={"max_num_batched_tokens": 2048})
    blasst = run_generation_subprocess(GenerationSpec(
        backend="CUSTOM", **{**common, "extra_llm_kwargs": {
            **common["extra_llm_kwargs"], "additional_config": {"blackwell_sparse": {"decode_threshold_scale_factor": 1e-4}}}},
    ))
    dense = run_generation_subprocess(GenerationSpec(backend="CUSTOM", **common))
    agreement = token_agreement(blasst["tokens"], dense["tokens"])
    summary = {"agreement": agreement, "blasst_tokens_per_s": blasst["tokens_per_s"], "dense_tokens_per_s": dense["tokens_per_s"]}
    _artifact("llm_blasst_decode_vs_dense.json", summary)
    print(summary)
    assert blasst["generated_tokens"] == 8 * 48
    assert agreement >= 0.9, summary
