"""The part of ``vbs eval`` / ``vbs calibrate`` that runs inside one engine's process.

One engine per backend: stock ``FLASH_ATTN`` (FA3, the reference), or ``CUSTOM`` started
with a decode factor (so the BLASST kernel is in the captured graphs) and then swept over
factors in place through the per-row factor buffer (``decode_factors``), which the kernel
reads at run time: no recompilation, no new capture, the same graphs for every factor.

Decode-path log-likelihood: vLLM has no teacher-forced decode, so the true continuation
is forced one token per step by a logits processor (:class:`ForcedTokens`), while the
returned logprob is vLLM's *raw* logprob (computed from the model's logits before any
logits processor runs, ``logprobs_mode="raw_logprobs"``): each scored token is a real
decode step whose attention ran through the decode kernel. The first generated token
comes from prefill and is not scored. Check: the same positions scored by a prefill
(``prompt_logprobs``) agree with the decode path within rounding (``hand_check``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

from vllm_blackwell_sparse.bench.engine_process import decode_graphs_compilation, worker_main
from vllm_blackwell_sparse.evaluate import fit as fitting
from vllm_blackwell_sparse.evaluate import tasks

try:  # the logits-processor interface (the worker imports vLLM anyway; CPU tests import tasks/fit only)
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor
except ImportError:  # pragma: no cover
    AdapterLogitsProcessor = object

FORCED_TOKENS_KEY = "vbs_forced_tokens"


class ForcedTokens(AdapterLogitsProcessor):
    """Greedy sampling of ``SamplingParams.extra_args["vbs_forced_tokens"]``, one per step."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        forced = (params.extra_args or {}).get(FORCED_TOKENS_KEY)
        if not forced:
            return None

        def force(output_ids, logits):
            i = len(output_ids)
            if i < len(forced):
                logits.fill_(-math.inf)
                logits[forced[i]] = 0.0
            return logits

        return force


@dataclass
class EvalEngineSpec:
    """One engine (JSON-serialisable for the worker process)."""

    name: str
    backend: str  # FLASH_ATTN or CUSTOM
    model: str
    factors: list = field(default_factory=lambda: [None])  # CUSTOM: swept in place; None = nothing skipped
    tasks: dict = field(default_factory=dict)  # {"loglik": {...}, "passkey": {...}, "agreement": {...}, "calibrate": {...}}
    max_model_len: int = 8192
    block_size: int = 128
    gpu_memory_utilization: float = 0.35
    max_num_seqs: int = 128
    enforce_eager: bool = False
    seed: int = 0


class Counter:
    """Decode (skipped, eligible) tiles over a block of work (``VBS_BLASST_STATS``)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        if self.on:
            from vllm_blackwell_sparse.blasst_stats import blasst_stats

            self.before = blasst_stats()["decode"]
        return self

    def __exit__(self, *exc):
        if self.on:
            from vllm_blackwell_sparse.blasst_stats import blasst_stats

            after = blasst_stats()["decode"]
            self.skipped = after["skipped"] - self.before["skipped"]
            self.eligible = after["eligible"] - self.before["eligible"]
        return False

    def result(self) -> dict:
        if not self.on:
            return {}
        return {"skipped_tiles": self.skipped, "eligible_tiles": self.eligible,
                "sparsity": self.skipped / self.eligible if self.eligible else 0.0}


def _set_factor(spec: EvalEngineSpec, factor):
    if spec.backend != "CUSTOM":
        return
    from vllm_blackwell_sparse.decode_factors import set_decode_threshold_scale_factor

    if set_decode_threshold_scale_factor(factor) == 0:
        raise RuntimeError("no decode factor buffer in this process: the engine must run in-process "
                           "(VLLM_ENABLE_V1_MULTIPROCESSING=0) with a decode factor set")


def _forced_logprobs(llm, prompts, continuations, params_cls):
    """Decode-path logprobs of each continuation (its first token, from prefill, dropped)."""
    params = [params_cls(temperature=0.0, max_tokens=len(c), logprobs=0, ignore_eos=True, detokenize=False,
                         extra_args={FORCED_TOKENS_KEY: list(c)}) for c in continuations]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    result = []
    for o, c in zip(outs, continuations):
        got = o.outputs[0]
        if list(got.token_ids) != list(c):
            raise RuntimeError("a forced continuation was not followed (logits processor not applied?)")
        result.append([lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)][1:])
    return result


def run(spec: EvalEngineSpec, log=print) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=spec.model, dtype="bfloat16", seed=spec.seed, max_model_len=spec.max_model_len,
        block_size=spec.block_size, gpu_memory_utilization=spec.gpu_memory_utilization,
        max_num_seqs=spec.max_num_seqs, enforce_eager=spec.enforce_eager, enable_prefix_caching=False,
        async_scheduling=False, attention_config={"backend": spec.backend}, generation_config="vllm",
        logits_processors=[ForcedTokens],
        **({} if spec.enforce_eager else {
            "compilation_config": decode_graphs_compilation({1, 2, 4, 8, 16, 32, 64, spec.max_num_seqs})}),
    )
    tok = llm.get_tokenizer()
    ids = tok.encode(tasks.corpus_text(), add_special_tokens=False)
    counting = spec.backend == "CUSTOM"
    result = {"spec": spec.__dict__, "startup_s": time.perf_counter() - t0, "corpus": tasks.CORPUS_NAME,
              "corpus_tokens": len(ids), "settings": []}
    for factor in spec.factors:
        _set_factor(spec, factor)
        setting = {"factor": factor, "tasks": {}}
        for name, cfg in spec.tasks.items():
            fn = TASKS[name]
            if factor is not None:  # the decode-vs-prefill check is about rounding: nothing skipped only
                cfg = {**cfg, "hand_check": False}
            t1 = time.perf_counter()
            setting["tasks"][name] = fn(llm, tok, ids, cfg, counting, SamplingParams, spec)
            log(f"  {spec.name} factor {factor}: {name} done in {time.perf_counter() - t1:.1f} s")
        result["settings"].append(setting)
    result["total_s"] = time.perf_counter() - t0
    return result


def task_loglik(llm, tok, ids, cfg, counting, params_cls, spec) -> dict:
    scored = cfg.get("scored_tokens", 128)
    out = {}
    for length in cfg["lengths"]:
        win = tasks.windows(ids, length, cfg.get("sequences", 24))
        prompts, conts = [w[:-scored] for w in win], [w[-scored:] for w in win]
        with Counter(counting) as c:
            lps = _forced_logprobs(llm, prompts, conts, params_cls)
        cell = {"logprobs": lps, "window_overlap": tasks.window_overlap(len(ids), length, len(win))}
        cell.update(c.result())
        if cfg.get("hand_check") and length == min(cfg["lengths"]):
            cell["hand_check"] = _hand_check(llm, prompts[:4], conts[:4], lps[:4], params_cls)
        out[str(length)] = cell
    return out


def _hand_check(llm, prompts, conts, decode_lps, params_cls) -> dict:
    """The same tokens scored by a prefill (prompt_logprobs): the decode path's values
    should agree within bf16 rounding (dense attention either way at factor None)."""
    params = params_cls(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p + c} for p, c in zip(prompts, conts)], params, use_tqdm=False)
    diffs = []
    samples = []
    for o, p, c, lps in zip(outs, prompts, conts, decode_lps):
        pl = o.prompt_logprobs
        for j in range(1, len(c)):
            pos = len(p) + j
            pre = pl[pos][c[j]].logprob
            diffs.append(abs(pre - lps[j - 1]))
            if len(samples) < 6 and j in (1, len(c) // 2, len(c) - 1):
                samples.append({"position": pos, "decode": lps[j - 1], "prefill": pre})
    return {"positions": len(diffs), "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
            "samples": samples}


def task_passkey(llm, tok, ids, cfg, counting, params_cls, spec) -> dict:
    depths = cfg.get("depths", [0.1, 0.3, 0.5, 0.7, 0.9])
    out = {}
    for length in cfg["lengths"]:
        trials = tasks.passkey_trials(length, cfg.get("trials", 100), depths, seed=spec.seed)
        n_filler = _filler_count(tok, length - cfg.get("max_tokens", 16))
        prompts = [_chat_ids(tok, tasks.passkey_user_message(t["key"], n_filler, t["depth"])) for t in trials]
        params = params_cls(temperature=0.0, max_tokens=cfg.get("max_tokens", 16), ignore_eos=True)
        with Counter(counting) as c:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        found = [tasks.passkey_found(t["key"], o.outputs[0].text) for t, o in zip(trials, outs)]
        cell = {"prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))], "found": found,
                "depths": [t["depth"] for t in trials], "sample_answer": outs[0].outputs[0].text}
        cell.update(c.result())
        out[str(length)] = cell
    return out


def _chat_ids(tok, message: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _filler_count(tok, budget: int) -> int:
    """The filler sentences that make the chat prompt about ``budget`` tokens (at most)."""
    base = len(_chat_ids(tok, tasks.passkey_user_message("12345", 0, 0.5)))
    per = len(tok.encode(" " + tasks.PASSKEY_FILLER, add_special_tokens=False))
    n = max(0, (budget - base) // per)
    while n and len(_chat_ids(tok, tasks.passkey_user_message("12345", n, 0.5))) > budget:
        n -= max(1, n // 100)
    return n


def task_agreement(llm, tok, ids, cfg, counting, params_cls, spec) -> dict:
    gen = cfg.get("max_tokens", 64)
    out = {}
    for length in cfg["lengths"]:
        win = tasks.windows(ids, length - gen, cfg.get("sequences", 24), part=(0.03, 0.97))
        params = params_cls(temperature=0.0, max_tokens=gen, ignore_eos=True, detokenize=False)
        with Counter(counting) as c:
            outs = llm.generate([{"prompt_token_ids": w} for w in win], params, use_tqdm=False)
        cell = {"tokens": [list(o.outputs[0].token_ids) for o in outs]}
        cell.update(c.result())
        out[str(length)] = cell
    return out


def task_calibrate(llm, tok, ids, cfg, counting, params_cls, spec) -> dict:
    """Sweep the factor grid over calibration windows (first half of the text), fit, pick a
    factor per target, and measure it on held-back windows (second half). Runs its own
    factor sweep (the engine's ``factors`` list is ignored)."""
    if not counting:
        raise RuntimeError("calibration needs the CUSTOM backend with VBS_BLASST_STATS=1")
    scored = cfg.get("decode_tokens", 64)
    n = cfg.get("sequences", 16)

    def measure(factor, part):
        _set_factor(spec, factor)
        cells = {}
        for length in cfg["lengths"]:
            win = tasks.windows(ids, length, n, part=part)
            with Counter(True) as c:
                _forced_logprobs(llm, [w[:-scored] for w in win], [w[-scored:] for w in win], params_cls)
            cells[str(length)] = c.result()
        return cells

    points = []
    grid = {}
    for f in cfg["factors"]:
        grid[repr(f)] = measure(f, (0.0, 0.5))
        points += [{"factor": f, "kv_len": int(length), "sparsity": r["sparsity"]} for length, r in grid[repr(f)].items()]
        log_line = ", ".join(f"{length}: {r['sparsity']:.1%}" for length, r in grid[repr(f)].items())
        print(f"  calibrate: factor {f:g}: {log_line}", flush=True)
    model = fitting.fit(points)
    lengths = [int(x) for x in cfg["lengths"]]
    targets = []
    for target in cfg["targets"]:
        factor = fitting.factor_for(model, target, lengths)
        entry = {"target": target, "factor": factor}
        if factor is not None:
            held = measure(factor, (0.5, 1.0))
            skipped = sum(r["skipped_tiles"] for r in held.values())
            eligible = sum(r["eligible_tiles"] for r in held.values())
            entry.update(held_back=held, held_back_sparsity=skipped / eligible if eligible else 0.0,
                         held_back_mean_over_lengths=sum(r["sparsity"] for r in held.values()) / len(held))
        targets.append(entry)
    _set_factor(spec, spec.factors[0] if spec.factors else None)
    return {"grid": grid, "points": points, "fit": model, "targets": targets,
            "reachable": {str(k): v for k, v in fitting.reachable(points).items()}}


TASKS = {"loglik": task_loglik, "passkey": task_passkey, "agreement": task_agreement, "calibrate": task_calibrate}


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], EvalEngineSpec, run))
