"""Shared by the GPU tests that need the real SmolLM2 checkpoint (``vbs model prepare``):
where it is, and prompts cut from the evaluation text."""

import os
from pathlib import Path

import pytest


def real_model_dir() -> str:
    for candidate in (os.environ.get("VBS_REAL_MODEL"), "/tmp/smollm2"):
        if candidate and Path(candidate, "config.json").exists():
            return candidate
    from vllm_blackwell_sparse.models.prepare import MODELS, default_cache_dir

    path = default_cache_dir() / next(iter(MODELS))
    if (path / "config.json").exists():
        return str(path)
    pytest.skip("no prepared real model (vbs model prepare smollm2-135m-instruct, or VBS_REAL_MODEL=DIR)")


def text_prompts(tokenizer, lengths):
    from vllm_blackwell_sparse.evaluate import tasks

    ids = tokenizer.encode(tasks.corpus_text(), add_special_tokens=False)
    # One window per length, each from its own stretch of the text.
    return [tasks.windows(ids, n, 1, part=(0.05 + 0.2 * i, 1.0))[0] for i, n in enumerate(lengths)]
