"""Offline inference with the CUSTOM backend on the embedded tiny Llama (dummy weights)."""

import sys

import torch

if not torch.cuda.is_available():
    sys.exit("this example runs vLLM on an sm90 / sm100 GPU and CUDA is not available here "
             "(`vbs demo` shows a CPU demonstration of the oracles instead)")

from vllm import LLM, SamplingParams

from vllm_blackwell_sparse.demo import TINY_LLAMA_DIR

llm = LLM(
    str(TINY_LLAMA_DIR),
    load_format="dummy",  # no weights ship with the tiny model: its text is meaningless
    attention_backend="CUSTOM",  # vllm-blackwell-sparse (dense: FA3 on Hopper, FA4 on Blackwell)
    additional_config={"blackwell_sparse": {}},  # see the README's configuration reference
    max_model_len=4096,
    gpu_memory_utilization=0.3,
)
for out in llm.generate(["Long-context serving spends"], SamplingParams(temperature=0.0, max_tokens=16)):
    print(out.outputs[0].text)
