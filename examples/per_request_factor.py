"""BLASST decode with a threshold scale factor per request, on the real SmolLM2
(`vbs model prepare smollm2-135m-instruct` first). Not run on a GPU as a script; the same
calls are tested in tests/gpu/test_llm_request_factors.py."""

import sys

import torch

if not torch.cuda.is_available():
    sys.exit("this example runs vLLM on an sm90 GPU and CUDA is not available here")

from vllm import LLM, SamplingParams

from vllm_blackwell_sparse.models.prepare import MODELS, default_cache_dir
from vllm_blackwell_sparse.request_factors import REQUEST_FACTOR_KEY, DecodeFactorRows

model = default_cache_dir() / next(iter(MODELS))
if not (model / "config.json").exists():
    sys.exit(f"no checkpoint at {model}: run `vbs model prepare smollm2-135m-instruct` first")

llm = LLM(
    str(model),
    attention_backend="CUSTOM",
    # The engine factor selects the BLASST decode kernel; requests without their own factor use it.
    additional_config={"blackwell_sparse": {"decode_threshold_scale_factor": 64}},
    # Keeps vLLM's batch rows and the kernel's per-row factors in step (and validates the key).
    logits_processors=[DecodeFactorRows],
    max_model_len=8192,
    gpu_memory_utilization=0.3,
)
prompt = "Explain in one paragraph why long-context decoding is limited by memory bandwidth."
for setting in ("off", None, 512):
    extra = None if setting is None else {REQUEST_FACTOR_KEY: setting}
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=48, extra_args=extra), use_tqdm=False)
    print(f"factor {setting if setting is not None else 'engine (64)'}: {out[0].outputs[0].text!r}")
