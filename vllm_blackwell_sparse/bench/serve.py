"""``vbs bench serve``: decode speed of a real model served by vLLM, stock FLASH_ATTN
against our backend dense, our BLASST kernel with nothing skipped (the control) and at
several factors, every ratio from one command on one host.

Each configuration is a fresh engine in its own process (the factor reaches it through
``VBS_DECODE_THRESHOLD_SCALE_FACTOR``, which vLLM's compile hash does not include, so no
factor recompiles anything; the attention op is a graph splitting op, so the compiled
graph never sees the impl's settings). In the engine process (``LLM`` with the engine
core in process) each cell submits ``batch`` requests whose prompts are disjoint slices
of real text, so no two requests share a prefix-cache block (checked: ``cached_tokens``
is recorded), then steps the engine by hand:

* **TPOT** is measured on the steady window in which every request of the cell is
  decoding and none has finished: elapsed time over the tokens one request generated
  in it (and the median step time of the window's pure-decode steps), not from
  differences between separate ``generate`` calls.
* **TTFT** per request from the engine's own timestamps (first token - queued).
* **Where the time goes**: a few decode steps of the window run under
  ``torch.profiler`` (CUDA-graph replays included): GPU time per step, attention
  kernels' share (excluded from the timing statistics).
* **Skipped fraction of the same run**: the kernel's own counters
  (``VBS_BLASST_STATS``), skipped / eligible 16-key tiles over the cell's decode steps.
* **Bytes**: the KV the decode steps must read (K and V of every visible key, each
  layer), K plus the kept tiles' V for BLASST; achieved TB/s; the byte bound
  1 / (0.5 + 0.5 (1 - s)) beside each speedup.

``--server`` drives vLLM's OpenAI server instead (``python -m
vllm.entrypoints.openai.api_server`` on 127.0.0.1) with a bounded streaming load
generator: client-side TTFT / TPOT, and the skipped fraction from the server's own log
lines (``VBS_BLASST_STATS``).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_blackwell_sparse.bench.engine_process import decode_graphs_compilation, worker_main

CONTROL_FACTOR = 1e9  # λ = factor / kv_len >= 1 for every request: the kernel runs, nothing is skipped
DEFAULT_CELLS = ((8, 4096), (64, 4096), (8, 7000), (64, 7000))
DEFAULT_FACTORS = (64.0, 512.0, 2048.0)
PROFILED_STEPS = 4
# Kernel names of FA3 / FA4 (flash::FlashAttnFwdSm90, ...FwdCombine) and ours (BlasstDecode,
# BlasstCombine); vLLM's reshape_and_cache_flash (the cache write) is not attention here.
ATTENTION_KERNEL_MARKERS = ("FlashAttn", "flash_fwd", "Blasst")


@dataclass
class EngineSpec:
    """One engine configuration (JSON-serialisable for the worker process)."""

    name: str
    backend: str  # FLASH_ATTN or CUSTOM
    factor: float | None  # VBS_DECODE_THRESHOLD_SCALE_FACTOR; None = dense
    model: str
    cells: list  # [[batch, prompt_tokens], ...]
    max_tokens: int = 128
    enforce_eager: bool = False
    compile: bool = False  # torch.compile + vLLM's default graph mode; False: no compile, full decode graphs
    max_model_len: int = 8192
    block_size: int = 128
    gpu_memory_utilization: float = 0.2
    max_num_batched_tokens: int = 16384
    stats: bool = True  # VBS_BLASST_STATS with a factor (False: the stats-overhead twin)
    extra: dict = field(default_factory=dict)


def engine_specs(model: str, cells, factors, max_tokens: int, eager_cell=None, compile=False,
                 stats_overhead=False) -> list[EngineSpec]:
    common = dict(model=model, max_tokens=max_tokens, compile=compile)
    specs = [EngineSpec("stock FLASH_ATTN", "FLASH_ATTN", None, cells=list(cells), **common),
             EngineSpec("CUSTOM dense", "CUSTOM", None, cells=list(cells), **common),
             EngineSpec("CUSTOM BLASST control", "CUSTOM", CONTROL_FACTOR, cells=list(cells), **common)]
    specs += [EngineSpec(f"CUSTOM BLASST f{f:g}", "CUSTOM", f, cells=list(cells), **common) for f in factors]
    if eager_cell:  # stock, dense and the largest factor
        largest = [s for s in specs[3:] if s.factor == max(factors)][:1] if factors else []
        for s in specs[:2] + largest:
            specs.append(EngineSpec(s.name + " (eager)", s.backend, s.factor, cells=[list(eager_cell)],
                                    enforce_eager=True, **common))
    if stats_overhead and factors:  # the largest factor again without VBS_BLASST_STATS
        f = max(factors)
        specs.append(EngineSpec(f"CUSTOM BLASST f{f:g} (no stats)", "CUSTOM", f, cells=list(cells), stats=False,
                                **common))
    return specs


# --------------------------------------------------------------------------------------
# The engine process
# --------------------------------------------------------------------------------------


def corpus_token_slices(tokenizer, lengths: list[int]) -> list[list[int]]:
    """Disjoint slices of real text (the Python standard library's sources, PSF license,
    present on every machine that runs Python) of the given token lengths."""
    need = sum(lengths)
    ids: list[int] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            ids += tokenizer.encode(path.read_text(errors="replace"), add_special_tokens=False)
        except OSError:
            continue
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise RuntimeError(f"the corpus has {len(ids)} tokens, the cells need {need}")
    out, pos = [], 0
    for n in lengths:
        out.append(ids[pos:pos + n])
        pos += n
    return out


def model_shape(model_dir: str) -> dict:
    cfg = json.loads(Path(model_dir, "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return {"layers": cfg["num_hidden_layers"], "num_q_heads": heads,
            "num_kv_heads": cfg.get("num_key_value_heads", heads),
            "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads, "dtype_bytes": 2}


def run_engine(spec: EngineSpec, log=print) -> dict:
    """Every cell of ``spec`` in one engine, in this process."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    t_start = time.perf_counter()
    batches = sorted({c[0] for c in spec.cells})
    compilation = None
    if not spec.compile and not spec.enforce_eager:
        compilation = decode_graphs_compilation({1, 2, 4, 8, 16, 32, 64} | set(batches))
    kwargs = dict(
        model=spec.model, dtype="bfloat16", seed=0, max_model_len=spec.max_model_len, block_size=spec.block_size,
        gpu_memory_utilization=spec.gpu_memory_utilization, enforce_eager=spec.enforce_eager,
        max_num_seqs=max(batches), max_num_batched_tokens=spec.max_num_batched_tokens,
        attention_config={"backend": spec.backend}, disable_log_stats=False, generation_config="vllm",
        **spec.extra,
    )
    if compilation:
        kwargs["compilation_config"] = compilation
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - t_start
    engine = llm.llm_engine
    tok = llm.get_tokenizer()
    shape = model_shape(spec.model)
    lengths = []
    for b, n in spec.cells:
        lengths += [32] * 4 + [n] * b  # a short warm-up per cell, then the cell's prompts
    slices = iter(corpus_token_slices(tok, lengths))
    stats_on = spec.factor is not None and spec.stats
    if stats_on:
        from vllm_blackwell_sparse.blasst_stats import blasst_stats
    result = {"spec": asdict(spec), "startup_s": startup_s, "model_shape": shape, "cells": []}
    for b, n in spec.cells:
        warm = [next(slices) for _ in range(4)]
        llm.generate([{"prompt_token_ids": p} for p in warm],
                     SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        prompts = [next(slices) for _ in range(b)]
        before = blasst_stats()["decode"] if stats_on else None
        params = SamplingParams(temperature=0.0, max_tokens=spec.max_tokens, ignore_eos=True, detokenize=False,
                                output_kind=RequestOutputKind.DELTA)
        ids = [f"{spec.name}-{b}x{n}-{i}" for i in range(b)]
        for rid, p in zip(ids, prompts):
            engine.add_request(rid, {"prompt_token_ids": p}, params)
        cell = _step_cell(engine, ids, spec.max_tokens, torch)
        if stats_on:
            after = blasst_stats()["decode"]
            skipped, eligible = after["skipped"] - before["skipped"], after["eligible"] - before["eligible"]
            cell["skipped_tiles"], cell["eligible_tiles"] = skipped, eligible
            cell["sparsity"] = skipped / eligible if eligible else 0.0
        cell.update(batch=b, prompt_tokens=n)
        cell.update(_bytes(cell, shape, n))
        result["cells"].append(cell)
        log(f"  {spec.name}: B{b} x {n}: TPOT {cell['tpot_ms']:.3f} ms (median step {cell['median_decode_step_ms']:.3f}),"
            f" TTFT median {cell['ttft_median_ms']:.0f} ms"
            + (f", skipped {cell['sparsity']:.1%}" if stats_on else "")
            + (f", attention {cell['profile']['attention_ms_per_step']:.3f} of {cell['profile']['gpu_ms_per_step']:.3f}"
               " GPU ms/step" if cell.get("profile", {}).get("gpu_ms_per_step") else ""))
    result["total_s"] = time.perf_counter() - t_start
    return result


def _step_cell(engine, ids, max_tokens, torch, profile: bool = True) -> dict:
    """Step the engine until the cell's requests finish; time the steady decode window."""
    batch = len(ids)
    generated = dict.fromkeys(ids, 0)
    first_token_step = {}
    finished = {}
    steps = []  # (t0, t1, tokens, all_decoding_before, none_finished_before, mean tokens per request after)
    profile_steps = set()
    prof = None
    prof_result = {}
    while engine.has_unfinished_requests():
        all_decoding = len(first_token_step) == batch
        none_finished = not finished
        k = len(steps)
        if profile and prof is None and all_decoding and none_finished and not profile_steps and generated[ids[0]] >= 16:
            try:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
                prof.__enter__()
                prof_first = k
            except Exception as e:  # noqa: BLE001 - the timing does not need it
                prof_result, profile, prof = {"error": f"{type(e).__name__}: {e}"}, False, None
        t0 = time.perf_counter()
        outs = engine.step()
        t1 = time.perf_counter()
        tokens = 0
        for o in outs:
            if o.request_id not in generated:
                continue
            got = len(o.outputs[0].token_ids)
            if got and o.request_id not in first_token_step:
                first_token_step[o.request_id] = k
            generated[o.request_id] += got
            tokens += got
            if o.finished:
                finished[o.request_id] = o
        steps.append((t0, t1, tokens, all_decoding, none_finished, sum(generated.values()) / batch))
        if prof is not None and k - prof_first + 1 >= PROFILED_STEPS:
            profile_steps = set(range(prof_first, k + 1))
            try:
                torch.cuda.synchronize()
                prof.__exit__(None, None, None)
                prof_result = _profile_summary(prof, len(profile_steps))
            except Exception as e:  # noqa: BLE001
                prof_result = {"error": f"{type(e).__name__}: {e}"}
            prof = None
    # The steady window: from the first step at which every request had its first token
    # to the last step before one finished.
    window = [i for i, s in enumerate(steps) if s[3] and s[4] and i not in profile_steps]
    pure = [(steps[i][1] - steps[i][0]) * 1e3 for i in window if steps[i][2] == batch]
    cell = {"steps": len(steps), "window_steps": len(window), "pure_decode_steps": len(pure),
            "median_decode_step_ms": statistics.median(pure) if pure else float("nan"), "profile": prof_result}
    win = [i for i, s in enumerate(steps) if s[3] and s[4]]
    # TPOT: the time from one step's end to the next one's (the engine's whole step,
    # scheduling and output processing included) over the tokens each request got in it,
    # on the window; intervals that hold the profiler's start, steps or summary are left out.
    intervals = [(steps[i][1] - steps[i - 1][1], steps[i][2] / batch) for i in win
                 if i > 0 and i not in profile_steps and i - 1 not in profile_steps]
    span, toks = sum(t for t, _ in intervals), sum(n for _, n in intervals)
    cell["tpot_ms"] = span / toks * 1e3 if toks > 0 else float("nan")
    cell["decode_tokens_per_s"] = batch * toks / span if span > 0 else float("nan")
    cell["step_end_times_s"] = [round(s[1] - steps[0][0], 6) for s in steps]  # for re-analysis
    ttft, tpot_engine, cached = [], [], []
    for o in finished.values():
        m = o.metrics
        if m is not None and m.first_token_ts:
            if m.queued_ts:
                ttft.append((m.first_token_ts - m.queued_ts) * 1e3)
            if m.num_generation_tokens > 1:
                tpot_engine.append((m.last_token_ts - m.first_token_ts) / (m.num_generation_tokens - 1) * 1e3)
        cached.append(getattr(o, "num_cached_tokens", None) or 0)
    cell.update(ttft_median_ms=statistics.median(ttft) if ttft else float("nan"), ttft_max_ms=max(ttft, default=float("nan")),
                engine_tpot_median_ms=statistics.median(tpot_engine) if tpot_engine else float("nan"),
                cached_prompt_tokens=sum(cached), generated_tokens=sum(generated.values()),
                decode_window_mean_generated=statistics.mean(generated.values()) if generated else 0)
    # Mean tokens per request at the window's ends: the sequences' mean length there
    # (prompt + these) gives the bytes a decode step of the window reads.
    cell["window_token_range"] = [steps[win[0] - 1][5] if win and win[0] else 0.0, steps[win[-1]][5] if win else 0.0]
    return cell


def _profile_summary(prof, n_steps: int) -> dict:
    """GPU time per profiled step: all kernels, the attention kernels (by name), the top
    kernels, and how many CUDA graphs were launched (decode runs as graph replays)."""
    kernels: dict[str, float] = {}
    graph_launches = 0
    for e in prof.events():
        if e.name == "cudaGraphLaunch":
            graph_launches += 1
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us()
    total = sum(kernels.values()) / 1e3 / n_steps
    attention = sum(v for k, v in kernels.items() if any(m in k for m in ATTENTION_KERNEL_MARKERS)) / 1e3 / n_steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"steps": n_steps, "gpu_ms_per_step": total, "attention_ms_per_step": attention,
            "cuda_graph_launches": graph_launches,
            "top_kernels_ms_per_step": {k[:120]: v / 1e3 / n_steps for k, v in top}}


def _bytes(cell, shape, prompt_tokens) -> dict:
    """KV bytes one decode step of the window reads, and the achieved TB/s over the whole
    step and over the attention kernels' GPU time. The skipped share of the eligible tiles
    stands for the share of all tiles (each split's first tile is never eligible: 3-6% of
    the tiles at 4K-7K keys), so the bytes saved and the bound are slightly overstated."""
    g0, g1 = cell["window_token_range"]
    mean_len = prompt_tokens + (g0 + g1) / 2
    per_key = shape["layers"] * shape["num_kv_heads"] * shape["head_dim"] * shape["dtype_bytes"]  # K or V
    dense = cell["batch"] * mean_len * per_key * 2
    s = cell.get("sparsity", 0.0)
    read = dense * (1 - s / 2)  # K always, V of kept tiles
    step_s = cell["tpot_ms"] / 1e3
    attn_ms = (cell.get("profile") or {}).get("attention_ms_per_step")
    return {"kv_bytes_per_step_dense": dense, "kv_bytes_per_step_read": read,
            "kv_tb_s": read / step_s / 1e12 if step_s > 0 else float("nan"),
            "attention_tb_s": read / (attn_ms / 1e3) / 1e12 if attn_ms else float("nan"),
            "byte_bound_speedup": 1 / (0.5 + 0.5 * (1 - s))}


# --------------------------------------------------------------------------------------
# The driver: one process per engine, results combined
# --------------------------------------------------------------------------------------


def engine_env(spec: EngineSpec) -> dict:
    from vllm_blackwell_sparse.bench.engine_process import engine_environment

    return engine_environment(spec.factor, 5 if spec.factor is not None and spec.stats else None)


def run_engine_subprocess(spec: EngineSpec, timeout: float, log=print) -> dict:
    from vllm_blackwell_sparse.bench.engine_process import run_json_worker

    stats_lines = []

    def on_line(line):
        if "BLASST decode:" in line:
            stats_lines.append(line)
        if line.startswith("  ") and spec.name in line:
            log(line)

    result = run_json_worker(["vllm_blackwell_sparse.bench.serve", "--engine"], asdict(spec), engine_env(spec),
                             timeout, on_line)
    if "error" in result:
        return {"spec": asdict(spec), **result}
    result["stats_log_lines"] = stats_lines[-20:]  # VBS_BLASST_STATS, as the engine logged it
    return result


def summarize(result: dict) -> dict:
    """Ratios per cell: vs stock FLASH_ATTN, vs CUSTOM dense, vs the control."""
    by_name = {e["spec"]["name"]: e for e in result["engines"] if "cells" in e}

    def cell_of(name, b, n):
        e = by_name.get(name)
        return next((c for c in e["cells"] if c["batch"] == b and c["prompt_tokens"] == n), None) if e else None

    rows = []
    for e in result["engines"]:
        if "cells" not in e:
            continue
        eager = " (eager)" if e["spec"]["enforce_eager"] else ""
        for c in e["cells"]:
            b, n = c["batch"], c["prompt_tokens"]
            row = {"engine": e["spec"]["name"], "batch": b, "prompt_tokens": n, "tpot_ms": c["tpot_ms"],
                   "ttft_median_ms": c["ttft_median_ms"], "decode_tokens_per_s": c["decode_tokens_per_s"],
                   "sparsity": c.get("sparsity"), "eligible_tiles": c.get("eligible_tiles"),
                   "kv_tb_s": c["kv_tb_s"], "attention_tb_s": c.get("attention_tb_s"),
                   "byte_bound": c["byte_bound_speedup"],
                   "kv_gb_per_step": c["kv_bytes_per_step_read"] / 1e9,
                   "attention_ms_per_step": c.get("profile", {}).get("attention_ms_per_step"),
                   "gpu_ms_per_step": c.get("profile", {}).get("gpu_ms_per_step"),
                   "cached_prompt_tokens": c["cached_prompt_tokens"]}
            for ref in ("stock FLASH_ATTN", "CUSTOM dense", "CUSTOM BLASST control"):
                rc = cell_of(ref + eager, b, n)
                row[f"speedup_vs_{ref.split()[-1].lower()}"] = rc["tpot_ms"] / c["tpot_ms"] if rc else None
            if e["spec"]["name"].endswith(" (no stats)"):  # what VBS_BLASST_STATS costs, same factor
                counted = cell_of(e["spec"]["name"][:-len(" (no stats)")], b, n)
                if counted:
                    row["stats_overhead"] = counted["tpot_ms"] / c["tpot_ms"] - 1
                    row["stats_overhead_median_step"] = (counted["median_decode_step_ms"] / c["median_decode_step_ms"]
                                                         - 1)
            rows.append(row)
    return {"rows": rows}


def markdown(result: dict) -> str:
    rows = result["summary"]["rows"]
    head = ("| engine | B × prompt | TPOT ms | vs stock | vs CUSTOM dense | vs control | skipped (eligible tiles) | "
            "byte bound | KV GB/step | TB/s (step / attention) | attention / GPU ms per step | TTFT median ms |")
    lines = [head, "|" + "---|" * 12]

    def f(x, fmt, unit=""):
        ok = isinstance(x, (int, float)) and x is not None and not math.isnan(x)
        return format(x, fmt) + unit if ok else "–"

    for r in rows:
        skipped = f"{r['sparsity']:.1%} ({r['eligible_tiles']:,})" if r["sparsity"] is not None else "–"
        att = (f"{f(r['attention_ms_per_step'], '.3f')} / {f(r['gpu_ms_per_step'], '.3f')}"
               if r["gpu_ms_per_step"] else "–")
        lines.append(f"| {r['engine']} | {r['batch']} × {r['prompt_tokens']} | {f(r['tpot_ms'], '.3f')} | "
                     f"{f(r['speedup_vs_flash_attn'], '.2f', '×')} | {f(r['speedup_vs_dense'], '.2f', '×')} | "
                     f"{f(r['speedup_vs_control'], '.2f', '×')} | {skipped} | {f(r['byte_bound'], '.2f', '×')} | "
                     f"{f(r['kv_gb_per_step'], '.2f')} | {f(r['kv_tb_s'], '.2f')} / {f(r.get('attention_tb_s'), '.2f')} | "
                     f"{att} | {f(r['ttft_median_ms'], '.0f')} |")
    overhead = [r for r in rows if r.get("stats_overhead") is not None]
    if overhead:
        lines += ["", "VBS_BLASST_STATS cost (TPOT with counters / without, same factor, same host): " + ", ".join(
            f"{r['batch']} × {r['prompt_tokens']}: {r['stats_overhead']:+.1%} (median step "
            f"{r['stats_overhead_median_step']:+.1%})" for r in overhead) + "."]
    return "\n".join(lines)


def preflight(args) -> str | None:
    """The model to serve, or None (said why) when this machine cannot run the benchmark."""
    import torch

    if not torch.cuda.is_available():
        print("vbs bench serve: no CUDA device here; it serves a model on an sm90/sm100 GPU.")
        return None
    return resolve_model(args.model)


def main(args) -> int:
    """The offline-engine mode (``--server``: ``serve_server.main``)."""
    from vllm_blackwell_sparse.bench.topk import environment

    model = preflight(args)
    if model is None:
        return 2
    cells = args.cells or DEFAULT_CELLS
    specs = engine_specs(model, cells, args.factors, args.max_tokens, eager_cell=args.eager_cell, compile=args.compile,
                         stats_overhead=args.stats_overhead)
    if args.only:
        specs = [s for s in specs if any(o in s.name for o in args.only)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"environment": environment(), "command": " ".join(sys.argv), "model": model,
              "model_provenance": model_provenance(model), "engines": []}
    if out.exists() and args.append:
        result["engines"] = json.loads(out.read_text()).get("engines", [])
    for i, spec in enumerate(specs):
        print(f"[{i + 1}/{len(specs)}] {spec.name}: {len(spec.cells)} cells", flush=True)
        eng = run_engine_subprocess(spec, args.engine_timeout)
        if "error" in eng:
            print(f"  {spec.name} FAILED ({eng['error']}):\n{eng['log_tail'][-2000:]}", flush=True)
        result["engines"].append(eng)
        result["summary"] = summarize(result)
        out.write_text(json.dumps(result, indent=1))
    md = markdown(result)
    out.with_suffix(".md").write_text(md + "\n")
    print("\n" + md + f"\n\nwrote {out} and {out.with_suffix('.md')}")
    return 0


def resolve_model(model: str | None) -> str:
    """``--model``: a checkpoint folder, or a name ``vbs model prepare`` wrote (default:
    SmolLM2-135M-Instruct in the user cache)."""
    from vllm_blackwell_sparse.models.prepare import MODELS, default_cache_dir

    if model and Path(model).is_dir():
        return str(Path(model).resolve())
    name = model or next(iter(MODELS))
    path = default_cache_dir() / name
    if not Path(path, "config.json").exists():
        raise SystemExit(f"vbs bench serve: no checkpoint for {name!r} at {path}; run `vbs model prepare {name}` "
                         "first, or pass --model DIR")
    return str(path)


def model_provenance(model: str) -> dict | None:
    """What ``vbs model prepare`` recorded about the checkpoint (None if it did not write it)."""
    from vllm_blackwell_sparse.models.prepare import read_provenance

    return read_provenance(model)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--engine":
        sys.exit(worker_main(sys.argv[2:], EngineSpec, run_engine))
    raise SystemExit("run it as `vbs bench serve`")
