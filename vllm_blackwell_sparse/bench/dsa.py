"""``vbs bench dsa``: the tiny DeepSeek-V3.2 (dummy weights) with and without GVR top-k.

Each configuration runs in a fresh Python process (one vLLM engine each, in-process
engine core so the GVR statistics can be read). One run does, in order:

* **generation**: ``num_prompts`` token-id prompts of random lengths in ``prompt_len``
  (longer than k, so the top-k really selects) and random ``max_tokens``, with at most
  ``max_num_seqs`` running: requests finish and waiting ones arrive while others
  decode, and chunked prefills mix with decodes. Greedy tokens are returned for an
  exact comparison between runs.
* **decode step time** for each ``(batch, context)`` case: ``batch`` requests of
  ``context`` prompt tokens are prefilled, then ``engine.step()`` is timed while all of
  them decode (median over ``steps`` steps after ``warmup`` steps).

With ``stats`` on (``VBS_GVR_STATS=1``) the per-layer GVR counters of
``dsa.gvr_stats()`` after the generation are part of the result (hint hit rate, overlap
of consecutive top-k sets, rows with a tie at the cutoff).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# A source checkout ships the model config under examples/ (pass --model otherwise).
TINY_DSA_DIR = Path(__file__).resolve().parents[2] / "examples" / "tiny_deepseek_v32"


@dataclass
class DsaRunSpec:
    """One engine configuration and its workload (JSON-serialisable for the worker)."""

    gvr: bool
    enforce_eager: bool = False
    stats: bool = False
    model: str = str(TINY_DSA_DIR)
    max_model_len: int = 32768
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 8192
    gpu_memory_utilization: float = 0.45
    seed: int = 0
    # generation (exactness) workload
    num_prompts: int = 40
    prompt_len: tuple[int, int] = (2200, 12000)
    max_tokens: tuple[int, int] = (6, 40)
    # decode step timing: (batch, context) cases
    timing_cases: list = field(default_factory=list)
    timing_steps: int = 48
    timing_warmup: int = 8


def random_prompts(n: int, lengths: tuple[int, int], seed: int, vocab: int = 32000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def run_in_this_process(spec: DsaRunSpec) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core here: gvr_stats() is readable
    os.environ["VBS_GVR_STATS"] = "1" if spec.stats else "0"
    from vllm import LLM, SamplingParams

    from vllm_blackwell_sparse import dsa

    t0 = time.perf_counter()
    llm = LLM(
        model=spec.model,
        load_format="dummy",
        skip_tokenizer_init=True,
        generation_config="vllm",
        dtype="bfloat16",
        seed=spec.seed,
        max_model_len=spec.max_model_len,
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        enforce_eager=spec.enforce_eager,
        additional_config={"blackwell_sparse": {"gvr_topk": spec.gvr}},
    )
    result: dict = {"spec": asdict(spec), "init_seconds": time.perf_counter() - t0}
    result["gvr_layers"] = sorted(dsa._STATE.layers)

    rng = random.Random(spec.seed + 1)
    prompts = random_prompts(spec.num_prompts, spec.prompt_len, spec.seed)
    params = [
        SamplingParams(temperature=0.0, max_tokens=rng.randint(*spec.max_tokens), ignore_eos=True) for _ in prompts
    ]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    result["generation_seconds"] = time.perf_counter() - t0
    result["prompt_lens"] = [len(p) for p in prompts]
    result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    result["gvr_stats"] = dsa.gvr_stats(reset=True)

    result["timing"] = [time_decode_steps(llm, b, ctx, spec, case_id=i) for i, (b, ctx) in enumerate(spec.timing_cases)]
    return result


def time_decode_steps(llm, batch: int, context: int, spec: DsaRunSpec, case_id: int) -> dict:
    """Median ``engine.step()`` time while ``batch`` requests of ``context`` tokens decode."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    prompts = random_prompts(batch, (context, context), seed=1000 + case_id)
    # Early requests decode while later ones still prefill: leave room, abort when timed.
    params = SamplingParams(temperature=0.0, max_tokens=min(2000, spec.max_model_len - context - 1), ignore_eos=True)
    ids = [f"timing{case_id}-{i}" for i in range(batch)]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": p}, params)
    produced: dict[str, int] = {}
    while len(produced) < batch or min(produced.values()) < 1:  # prefill (and the first decodes)
        for out in engine.step():
            produced[out.request_id] = len(out.outputs[0].token_ids)
    times = []
    while engine.has_unfinished_requests() and len(times) < spec.timing_warmup + spec.timing_steps:
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        if len(outs) == batch:  # a pure decode step of the whole batch
            times.append(dt)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    timed = times[spec.timing_warmup :]
    return {
        "batch": batch,
        "context": context,
        "steps": len(timed),
        "step_ms_median": statistics.median(timed) * 1e3 if timed else None,
        "step_ms_p10": sorted(timed)[len(timed) // 10] * 1e3 if timed else None,
        "step_ms_p90": sorted(timed)[(9 * len(timed)) // 10] * 1e3 if timed else None,
    }


def run_subprocess(spec: DsaRunSpec, timeout: float = 580) -> dict:
    """:func:`run_in_this_process` in a fresh Python process; raises with its output on failure."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        cmd = [sys.executable, "-m", "vllm_blackwell_sparse.bench.dsa", "--worker", str(spec_path), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr)[-8000:]
            raise RuntimeError(f"DSA run {asdict(spec)} failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out.read_text())
        result["log_tail"] = (proc.stdout + proc.stderr)[-3000:]
        return result


def compare_tokens(a: list[list[int]], b: list[list[int]]) -> dict:
    """Exact comparison of two runs' greedy tokens, request by request."""
    differing = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    first = None
    if differing:
        i = differing[0]
        first = {"request": i, "position": next((j for j, (x, y) in enumerate(zip(a[i], b[i])) if x != y), None)}
    return {
        "requests": len(a),
        "tokens": sum(map(len, a)),
        "identical": not differing and len(a) == len(b),
        "differing_requests": differing,
        "first_difference": first,
    }


def main(args) -> int:
    import torch

    from vllm_blackwell_sparse.bench.topk import environment

    if not torch.cuda.is_available():
        print("vbs bench dsa: no CUDA device here; it runs the tiny DeepSeek-V3.2 on an sm90/sm100 GPU.")
        return 2
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    runs = {}
    for gvr in (False, True):
        spec = DsaRunSpec(
            gvr=gvr, model=args.model, num_prompts=args.num_prompts, timing_cases=cases,
            timing_steps=args.steps, enforce_eager=args.eager,
        )
        print(f"  running gvr_topk={gvr} ...", flush=True)
        runs["gvr" if gvr else "vllm"] = run_subprocess(spec)
    base, gvr = runs["vllm"], runs["gvr"]
    table = []
    for a, b in zip(base["timing"], gvr["timing"]):
        table.append({
            "batch": a["batch"], "context": a["context"],
            "vllm_step_ms": a["step_ms_median"], "gvr_step_ms": b["step_ms_median"],
            "gvr_over_vllm": b["step_ms_median"] / a["step_ms_median"] if a["step_ms_median"] else None,
        })
    result = {
        "environment": environment(),
        "command": "vbs bench dsa " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "dsa"] else []),
        "tokens": compare_tokens(base["tokens"], gvr["tokens"]),
        "decode_step": table,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in runs.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("| batch | context | vLLM top-k step (ms) | GVR step (ms) | GVR / vLLM |\n|---|---|---|---|---|")
    for r in table:
        print(f"| {r['batch']} | {r['context']} | {r['vllm_step_ms']:.3f} | {r['gvr_step_ms']:.3f} | {r['gvr_over_vllm']:.3f} |")
    print(f"identical tokens: {result['tokens']['identical']}; wrote {out}")
    return 0


def _worker_main(argv: list[str]) -> int:
    raw = json.loads(Path(argv[0]).read_text())
    raw["prompt_len"], raw["max_tokens"] = tuple(raw["prompt_len"]), tuple(raw["max_tokens"])
    raw["timing_cases"] = [tuple(c) for c in raw["timing_cases"]]
    result = run_in_this_process(DsaRunSpec(**raw))
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    print("use `vbs bench dsa`", file=sys.stderr)
    sys.exit(2)
