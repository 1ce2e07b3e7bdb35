"""``vbs demo``: offline ``LLM()``, our backend vs stock FLASH_ATTN.

On the real SmolLM2-135M-Instruct where ``vbs model prepare`` has written it (the user
cache), else on the embedded tiny dummy-weight Llama, saying so. Each backend runs in
its own Python process (a fresh vLLM engine each, nothing cached between them).
Reported: end-to-end generation tokens/s of each (prefill + decode of the whole batch,
after a warm-up) and the share of identical greedy tokens (with the dummy model the
text is meaningless; token equality is what compares).

Without CUDA it says so and demonstrates the torch oracles on CPU instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TINY_LLAMA_DIR = Path(__file__).resolve().parent / "models" / "tiny_llama"


@dataclass
class GenerationSpec:
    """One offline generation run (picklable to JSON for the worker process)."""

    backend: str = "CUSTOM"  # an AttentionBackendEnum name
    flash_attn_version: int | None = None  # for FLASH_ATTN: None = vLLM's choice (FA3 on Hopper)
    model: str = str(TINY_LLAMA_DIR)
    load_format: str = "dummy"  # "auto" for a real checkpoint
    num_prompts: int = 32
    prompt_tokens: int = 1024
    max_tokens: int = 128
    block_size: int = 128
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.3
    max_model_len: int = 4096
    prompt_lengths: list[int] | None = None  # per-prompt lengths instead of num_prompts x prompt_tokens
    logprobs: int | None = None  # also return the chosen tokens' logprobs
    extra_llm_kwargs: dict = field(default_factory=dict)


def build_prompts(tokenizer, num_prompts: int, prompt_tokens: int) -> list[list[int]]:
    """Deterministic token-id prompts cut from the model's corpus text."""
    text = (TINY_LLAMA_DIR / "corpus.txt").read_text()
    ids = tokenizer.encode(text)
    prompts = []
    for i in range(num_prompts):
        start = (i * 37) % len(ids)
        rolled = ids[start:] + ids[:start]
        reps = -(-prompt_tokens // len(rolled))
        prompts.append((rolled * reps)[:prompt_tokens])
    return prompts


def generate_tokens(spec: GenerationSpec) -> dict:
    """Run one backend in this process; returns tokens, timing and a sample text."""
    from vllm import LLM, SamplingParams

    attention_config = {"backend": spec.backend}
    if spec.flash_attn_version is not None:
        attention_config["flash_attn_version"] = spec.flash_attn_version
    llm = LLM(
        model=spec.model,
        load_format=spec.load_format,
        dtype="bfloat16",
        seed=0,
        max_model_len=spec.max_model_len,
        block_size=spec.block_size,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        enforce_eager=spec.enforce_eager,
        attention_config=attention_config,
        generation_config="vllm",
        **spec.extra_llm_kwargs,
    )
    if spec.prompt_lengths:
        longest = build_prompts(llm.get_tokenizer(), len(spec.prompt_lengths), max(spec.prompt_lengths))
        prompts = [p[:n] for p, n in zip(longest, spec.prompt_lengths)]
    else:
        prompts = build_prompts(llm.get_tokenizer(), spec.num_prompts, spec.prompt_tokens)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    greedy = SamplingParams(temperature=0.0, max_tokens=spec.max_tokens, ignore_eos=True, logprobs=spec.logprobs)
    llm.generate(inputs[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(inputs, greedy, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = None
    if spec.logprobs is not None:
        logprobs = [[step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    attn_cls = _attention_backend_class(llm)
    return {
        "logprobs": logprobs,
        "spec": asdict(spec),
        "seconds": seconds,
        "generated_tokens": sum(map(len, tokens)),
        "tokens_per_s": sum(map(len, tokens)) / seconds,
        "tokens": tokens,
        "sample_text": outs[0].outputs[0].text[:200],
        "attention_backend_class": attn_cls,
    }


def _attention_backend_class(llm) -> str | None:
    """The attention backend class the worker really used (best effort, TP=1)."""
    try:
        names = llm.llm_engine.collective_rpc(_backend_names_of_worker)
        return names[0] if names else None
    except Exception:  # noqa: BLE001 - informational only
        return None


def _backend_names_of_worker(worker) -> str:
    from vllm.model_executor.layers.attention.attention import Attention

    model = worker.model_runner.model
    names = {type(m.impl).__qualname__ for m in model.modules() if isinstance(m, Attention)}
    return ",".join(sorted(names))


def run_generation_subprocess(spec: GenerationSpec, timeout: float = 900) -> dict:
    """``generate_tokens`` in a fresh Python process; raises with its output on failure."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "vllm_blackwell_sparse.demo", "--worker", json.dumps(asdict(spec)), str(out)]
        env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr)[-6000:]
            raise RuntimeError(f"generation with backend {spec.backend} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two runs emitted the same token."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(max(len(ra), len(rb)) for ra, rb in zip(a, b))
    return same / total if total else 1.0


_DEFAULT = GenerationSpec()


def demo_model() -> tuple[dict, str]:
    """``(GenerationSpec fields, label)``: the real SmolLM2 where it is prepared, else the tiny model."""
    from vllm_blackwell_sparse.models.prepare import MODELS, default_cache_dir, read_provenance

    name = next(iter(MODELS))
    path = default_cache_dir() / name
    provenance = read_provenance(path)
    if provenance is not None and (path / "config.json").exists():
        label = f"{name} ({provenance.get('label') or provenance.get('source')})"
        return {"model": str(path), "load_format": "auto", "max_model_len": 8192}, label
    return {}, (f"the tiny dummy-weight Llama (no real model prepared: `vbs model prepare {name}` writes "
                f"{path})")


def run_demo(
    *,
    num_prompts: int = _DEFAULT.num_prompts,
    prompt_tokens: int = _DEFAULT.prompt_tokens,
    max_tokens: int = _DEFAULT.max_tokens,
    json_path: str | None = None,
) -> int:
    from vllm_blackwell_sparse.doctor import gpu_info

    gpu = gpu_info()
    if not gpu["cuda"] or gpu["capability"][0] not in (9, 10):
        why = f"no CUDA device here ({gpu['reason']})" if not gpu["cuda"] else f"{gpu['name']} is {gpu['arch']}"
        print(f"vbs demo: {why}.")
        print("The GPU demo needs an sm90/sm100 GPU; running the CPU demonstration of the torch oracles instead "
              "(--num-prompts, --prompt-tokens and --max-tokens are for the GPU demo).\n")
        return cpu_demo(json_path=json_path)
    model_fields, label = demo_model()
    print(f"vbs demo on {gpu['name']} ({gpu['arch']}): {label}, {num_prompts} prompts x "
          f"{prompt_tokens} tokens, {max_tokens} greedy tokens each")
    runs = {}
    from vllm_blackwell_sparse.backend import dense_fa_version

    dense = f"FA{dense_fa_version()}"
    for label, spec in (
        (f"CUSTOM (ours, {dense})", GenerationSpec(backend="CUSTOM", **model_fields)),
        ("FLASH_ATTN (stock)", GenerationSpec(backend="FLASH_ATTN", **model_fields)),
    ):
        spec.num_prompts, spec.prompt_tokens, spec.max_tokens = num_prompts, prompt_tokens, max_tokens
        print(f"  running {label} ...", flush=True)
        runs[label] = run_generation_subprocess(spec)
    (la, ra), (lb, rb) = runs.items()
    agree = token_agreement(ra["tokens"], rb["tokens"])
    for label, r in runs.items():
        print(f"  {label:22s} {r['tokens_per_s']:9.1f} tokens/s  ({r['generated_tokens']} tokens in {r['seconds']:.2f} s; "
              f"impl {r['attention_backend_class']})")
    print(f"  identical greedy tokens: {agree:.1%}  (where the two run different dense kernels, numerics differ in the "
          "last bits, so dummy-weight logits can tie-break differently)")
    print(f"  sample text (ours): {ra['sample_text'][:80]!r}")
    if json_path:
        _write_json(json_path, {"gpu": gpu, "agreement": agree, "runs": runs})
    return 0


def _write_json(path: str, data: dict) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=1))
    print(f"wrote {target}")


def cpu_demo(json_path: str | None = None) -> int:
    """Show the oracles' behaviour on synthetic data (CPU, a few seconds)."""
    import torch

    from vllm_blackwell_sparse.reference import (
        blasst_attention_reference,
        gvr_topk_emulation,
        paged_attention_dense,
        topk_reference,
    )
    from vllm_blackwell_sparse.workloads import CASE_TENSORS, PeakedAttentionParams, peaked_attention_case, random_topk_rows

    print("BLASST oracle: decode, 2 requests x 8K context, GQA 8/2, d 64, tile 128, peaked attention")
    case = peaked_attention_case([8192, 6000], [1, 1], 8, 2, 64, 16, PeakedAttentionParams(peak=9.0))
    args = [case[k] for k in CASE_TENSORS]
    dense = paged_attention_dense(*args)
    print(f"  {'scale factor':>12s} {'skipped/eligible':>17s} {'sparsity':>9s} {'max |out - dense|':>18s}")
    report = {"blasst": [], "gvr": []}
    for factor in (None, 1.0, 10.0, 100.0, 1000.0):
        res = blasst_attention_reference(*args, threshold_scale_factor=factor)
        err = (res.out - dense).abs().max().item()
        print(f"  {str(factor):>12s} {res.skipped_tiles:>8d}/{res.eligible_tiles:<8d} {res.sparsity:9.1%} {err:18.2e}")
        report["blasst"].append({"factor": factor, "skipped": res.skipped_tiles, "eligible": res.eligible_tiles,
                                 "max_abs_err": err})
    print("\nGVR emulation vs exact top-k (k = 2048, 8 rows x 32K N(0,1) logits, hint = a perturbed row's top-k)")
    print("  A counting pass counts the keys at or above a threshold, repeated until k to 3k keys remain. The first")
    print("  guess is the smallest logit at the hint's columns, or without a hint a quantile of a strided sample of")
    print("  the row. This hint comes from a perturbed row and guesses low, so it needs more passes than the sample;")
    print("  the guess changes the work only, never the result.")
    logits = random_topk_rows(8, 32768, seed=1)
    lens = torch.full((8,), 32768)
    prev = topk_reference(logits + 0.5 * random_topk_rows(8, 32768, seed=2), lens, 2048)
    for name, hint in (("true-ish hint", prev), ("no hint", None)):
        got, traces = gvr_topk_emulation(logits, lens, 2048, hint=hint, return_trace=True)
        exact = topk_reference(logits, lens, 2048)
        same = all(set(got[r].tolist()) == set(exact[r].tolist()) for r in range(8))
        passes = sum(t.count_passes for t in traces) / len(traces)
        cands = sum(t.candidates for t in traces) / len(traces)
        print(f"  {name:14s} exact: {same}; counting passes/row {passes:.1f}; candidates/row {cands:.0f}")
        report["gvr"].append({"hint": name, "exact": same, "counting_passes_per_row": passes, "candidates_per_row": cands})
    if json_path:
        _write_json(json_path, report)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--worker":
        from vllm_blackwell_sparse.bench.engine_process import worker_main

        sys.exit(worker_main(sys.argv[2:], GenerationSpec, generate_tokens))
    sys.exit(run_demo())
