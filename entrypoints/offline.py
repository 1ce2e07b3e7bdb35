#!/usr/bin/env python3
"""Offline generation with `LLM(MODEL, attention_backend="CUSTOM")`.

    python entrypoints/offline.py                     # the embedded tiny Llama, dummy weights
    python entrypoints/offline.py MODEL --prompt "..." --max-tokens 64 --additional-config '{"blackwell_sparse": {}}'
"""

import argparse
import json

from vllm_blackwell_sparse.demo import TINY_LLAMA_DIR

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=str(TINY_LLAMA_DIR))
    ap.add_argument("--prompt", action="append", default=None)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--additional-config", default="{}", help="JSON, as vLLM's --additional-config")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    tiny = args.model == str(TINY_LLAMA_DIR)
    llm = LLM(
        args.model,
        attention_backend="CUSTOM",
        additional_config=json.loads(args.additional_config),
        load_format="dummy" if tiny else "auto",
        max_model_len=4096 if tiny else None,
        gpu_memory_utilization=0.3 if tiny else 0.9,
    )
    prompts = args.prompt or ["Long-context serving spends most of its time"]
    for out in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens)):
        print(repr(out.prompt), "->", repr(out.outputs[0].text))
