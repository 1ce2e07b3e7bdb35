"""Per-request decode factors in LLM() under full decode CUDA graphs (real SmolLM2): a
batch mixing factors gives each request the tokens it gets in a batch of the same
prompts where every request has its factor; "off" and the engine's no-skip factor skip
nothing; a bad value is refused naming the key. One engine, in this process."""

import os

import pytest

from real_model import real_model_dir, text_prompts

KEY = "vbs_decode_threshold_scale_factor"
SETTINGS = [None, "off", 16, 256]  # None: the engine's factor (1e9: nothing skipped)


@pytest.fixture(scope="module")
def llm():
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VBS_DECODE_THRESHOLD_SCALE_FACTOR="1e9",
                      VBS_BLASST_STATS="1", VBS_BLASST_STATS_INTERVAL="3600")
    from vllm import LLM

    from vllm_blackwell_sparse.request_factors import DecodeFactorRows

    engine = LLM(model=real_model_dir(), dtype="bfloat16", max_model_len=8192, block_size=128, seed=0,
                 gpu_memory_utilization=0.25, max_num_seqs=8, enable_prefix_caching=False,
                 attention_config={"backend": "CUSTOM"}, generation_config="vllm",
                 logits_processors=[DecodeFactorRows],
                 compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": [1, 2, 4, 8]})
    yield engine
    del engine


def _run(llm, prompts, settings):
    from vllm import SamplingParams

    from vllm_blackwell_sparse.blasst_stats import blasst_stats

    params = [SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, detokenize=False,
                             extra_args=None if s is None else {KEY: s}) for s in settings]
    before = blasst_stats()["decode"]["skipped"]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], blasst_stats()["decode"]["skipped"] - before


def test_a_mixed_batch_gives_each_request_its_own_factor(llm):
    prompts = text_prompts(llm.get_tokenizer(), [3000, 4500, 6000, 7000])
    uniform = {}
    for s in SETTINGS:
        uniform[repr(s)] = _run(llm, prompts, [s] * len(prompts))
    assert uniform["None"][1] == 0 and uniform["'off'"][1] == 0
    assert uniform["256"][1] > uniform["16"][1] > 0
    mixed, skipped = _run(llm, prompts, SETTINGS)
    for i, s in enumerate(SETTINGS):
        assert mixed[i] == uniform[repr(s)][0][i], f"request {i} with factor {s!r}"
    assert skipped > 0
    # and back: the rows follow the batch, not the previous one
    again, _ = _run(llm, prompts, list(reversed(SETTINGS)))
    for i, s in enumerate(reversed(SETTINGS)):
        assert again[i] == uniform[repr(s)][0][i], f"request {i} with factor {s!r} (reversed)"


def test_a_bad_factor_is_refused_naming_the_key(llm):
    from vllm import SamplingParams

    with pytest.raises(ValueError, match=KEY):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                     SamplingParams(max_tokens=2, extra_args={KEY: "fast"}), use_tqdm=False)
