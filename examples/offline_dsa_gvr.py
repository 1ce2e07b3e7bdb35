"""GVR top-k in DeepSeek-V3.2's sparse-attention indexer, offline, on the tiny dummy-weight
V3.2 of examples/tiny_deepseek_v32 (no tokenizer, token-id prompts; DeepGEMM compiles
on first start, ~2 min). Any attention backend: GVR only replaces the indexer's decode top-k."""

import sys

import torch

if not torch.cuda.is_available():
    sys.exit("this example runs vLLM on an sm90 / sm100 GPU and CUDA is not available here "
             "(`vbs demo` shows a CPU demonstration of the oracles instead)")

from pathlib import Path

from vllm import LLM, SamplingParams

llm = LLM(
    str(Path(__file__).parent / "tiny_deepseek_v32"),
    load_format="dummy",  # no weights ship with the tiny model
    skip_tokenizer_init=True,
    generation_config="vllm",
    max_model_len=16384,
    gpu_memory_utilization=0.4,
    additional_config={"blackwell_sparse": {"gvr_topk": True}},  # or VBS_GVR_TOPK=1
)
prompts = [{"prompt_token_ids": [(7 * i + 3 * r) % 31000 + 2 for i in range(4000 + 1000 * r)]} for r in range(4)]
for out in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)):
    print(len(out.prompt_token_ids), "prompt tokens ->", out.outputs[0].token_ids)
