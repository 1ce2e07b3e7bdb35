"""``vbs bench topk``: DSA decode top-k kernels timed in one run on the same inputs.

Inputs are synthetic DeepSeek-V3.2 indexer logits (``workloads.dsa_decode_trace``):
step 0 gives the previous top-k (the "true hint"), step 1 is the row to select from.
Each kernel is checked against torch.topk (multiset of values) before it is timed.

Timing: CUDA events around the kernel alone, ``iters`` timed calls after ``warmup``,
median reported (µs); a GPU spin before each call hides the host's launch overhead. ``hot``: the logits are rewritten right before every call, as
the indexer GEMM leaves them in L2 in serving. ``cold``: a 256 MiB scratch buffer
(over 4× the H200's 60 MB L2) is rewritten before every call, evicting the logits.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from vllm_blackwell_sparse.bench.timing import checked_gpu_us
from vllm_blackwell_sparse.workloads import DSA_TRACE_PRESETS, DsaTraceParams, dsa_decode_trace, topk_overlap

DEFAULT_BATCHES = (1, 8, 32, 64, 128)
DEFAULT_NS = (16384, 32768, 65536, 131072)
FLUSH_BYTES = 256 * 1024 * 1024
# The GPU spins this long before each timed call (bench.timing.checked_gpu_us, which checks
# that the host's enqueueing fit in it): ~1 ms at the H200's clock. Results before
# 2026-12-01's fifth session spun 200_000 cycles (~100 µs) without that check.
SPIN_CYCLES = 2_000_000


GVR_CONFIG_FORMS = "auto, cN[tT][sS] (N 2/4/8/16, T 256/512, S 0/16/32) or THREADSxLOADS[xVEC] (VEC 1 or 4)"


def parse_gvr_config(spec: str) -> dict:
    """A GVR variant as :func:`gvr_topk` keyword arguments: ``auto`` (its defaults),
    ``cN[tT][sS]`` (a cluster of N CTAs of T threads per row, S columns per thread in shared
    memory) or ``THREADSxLOADS[xVEC]`` (one CTA per row with that tuning; VEC 1 or 4
    columns per load, omitted: by alignment)."""
    if spec == "auto":
        return {}
    if spec.startswith("c"):
        rest, ssep, smem = spec[1:].partition("s")
        ctas, sep, threads = rest.partition("t")
        if (ctas in ("2", "4", "8", "16") and (threads in ("256", "512") or not sep)
                and (smem in ("0", "16", "32") or not ssep)):
            return {"ctas_per_row": int(ctas), **({"threads": int(threads)} if threads else {}),
                    **({"smem_per_thread": int(smem)} if smem else {})}
        raise ValueError(f"a cluster GVR config is cN[tT][sS] with N 2/4/8/16, T 256/512 and S 0/16/32, got {spec!r}")
    try:
        threads, loads, *vec = (int(v) for v in spec.split("x"))
    except ValueError:
        raise ValueError(f"a GVR config is {GVR_CONFIG_FORMS}, got {spec!r}") from None
    if len(vec) > 1 or (vec and vec[0] not in (1, 4)):
        raise ValueError(f"a GVR config is {GVR_CONFIG_FORMS}, got {spec!r}")
    return {"ctas_per_row": 1, "threads": threads, "loads_in_flight": loads, "vec_width": vec[0] if vec else None}


def gvr_kernels(k: int, true_hint: torch.Tensor, n: int, configs=("auto",)) -> dict[str, Callable]:
    """Our GVR kernel with the previous step's top-k, a random hint, and no hint, for each
    config (:func:`parse_gvr_config`); the first config's names carry no suffix."""
    from vllm_blackwell_sparse.kernels.gvr_topk import gvr_topk

    rows = true_hint.shape[0]
    random_hint = torch.randint(0, n, (rows, k), dtype=torch.int32, device=true_hint.device)
    true_hint = true_hint.int().contiguous()
    kernels = {}
    for i, spec in enumerate(configs):
        sfx = "" if i == 0 else "@" + spec
        tune = parse_gvr_config(spec)
        kernels["gvr_true_hint" + sfx] = lambda x, lens, out, t=tune: gvr_topk(x, lens, k, hint=true_hint, out=out, **t)
        kernels["gvr_random_hint" + sfx] = lambda x, lens, out, t=tune: gvr_topk(x, lens, k, hint=random_hint, out=out, **t)
        kernels["gvr_no_hint" + sfx] = lambda x, lens, out, t=tune: gvr_topk(x, lens, k, out=out, **t)
    return kernels


def topk_kernels(rows: int, k: int) -> dict[str, Callable]:
    """Baselines as ``fn(logits, seq_lens_2d, out_int32) -> None``; vLLM's choice is the
    kernel its indexer picks (``topk_dispatch.vllm_decode_topk``: cooperative for <= 32
    aligned rows, persistent otherwise, on the H200)."""
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)

    from vllm_blackwell_sparse.topk_dispatch import VLLM_TOPK_WORKSPACE_BYTES, vllm_decode_topk

    ws = torch.zeros(VLLM_TOPK_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")

    def cooperative(x, lens, out):
        torch.ops._C.cooperative_topk(x, lens, out, ws, k, x.shape[1])

    def persistent(x, lens, out):
        torch.ops._C.persistent_topk(x, lens, out, ws, k, x.shape[1])

    def per_row(x, lens, out):
        torch.ops._C.top_k_per_row_decode(x, 1, lens, out, x.shape[0], x.stride(0), x.stride(1), k)

    def flashinfer_top_k(x, lens, out):
        import flashinfer

        out.copy_(flashinfer.top_k(x, k)[1])

    def torch_topk(x, lens, out):
        out.copy_(torch.topk(x, k, dim=1).indices)

    kernels = {"vllm_choice": lambda x, lens, out: vllm_decode_topk(x, lens, k, out, workspace=ws)}
    if rows <= 32:
        kernels["vllm_cooperative"] = cooperative
    kernels.update(vllm_persistent=persistent, vllm_per_row=per_row, flashinfer_top_k=flashinfer_top_k, torch_topk=torch_topk)
    return kernels


def dispatch_kernel(k: int, true_hint: torch.Tensor) -> Callable:
    """``topk_dispatch.decode_topk`` (GVR or vLLM's kernel by the measured crossover)."""
    from vllm_blackwell_sparse.topk_dispatch import VLLM_TOPK_WORKSPACE_BYTES, decode_topk

    hint = true_hint.int().contiguous()
    ws = torch.zeros(VLLM_TOPK_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    return lambda x, lens, out: decode_topk(x, lens, k, out, hint=hint, workspace=ws)


def inexact_reason(x: torch.Tensor, out: torch.Tensor, k: int, want_sorted: torch.Tensor | None = None) -> str | None:
    """Why ``out`` is not an exact top-k of ``x`` (None if it is); for the results' notes."""
    if bool((out < 0).any()) or bool((out >= x.shape[1]).any()):
        return f"{int(((out < 0) | (out >= x.shape[1])).sum())} indices outside [0, N)"
    idx = out.long()
    dup = int((torch.sort(idx, 1).values.diff(dim=1) == 0).sum())
    if dup:
        return f"{dup} duplicate indices"
    got = torch.sort(x.gather(1, idx), 1).values
    if want_sorted is None:
        want_sorted = torch.sort(torch.topk(x, k, dim=1).values, 1).values
    bad = (got != want_sorted).any(dim=1)
    if bool(bad.any()):
        return f"{int(bad.sum())} rows whose value multiset differs from torch.topk's"
    return None


def exact_against_torch(x: torch.Tensor, out: torch.Tensor, k: int, want_sorted: torch.Tensor | None = None) -> bool:
    """Indices valid and unique per row, values equal torch.topk's as multisets.
    ``want_sorted``: torch.topk's values of ``x`` sorted per row, if already computed."""
    return inexact_reason(x, out, k, want_sorted) is None


def time_kernel(fn: Callable, x: torch.Tensor, src: torch.Tensor, lens, out, *, l2: str, iters: int, warmup: int) -> float:
    """Median µs of ``fn`` alone; see the module docstring for ``l2``."""
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device="cuda") if l2 == "cold" else None
    times = []
    for i in range(warmup + iters):
        def write_inputs(i=i):
            x.copy_(src)  # the "indexer" writes the logits
            if flush is not None:
                flush.fill_(float(i))

        # The GPU spins while the host enqueues, so the events time the kernel and not the
        # Python launch overhead of whichever wrapper is being measured.
        t = checked_gpu_us(lambda: fn(x, lens, out), SPIN_CYCLES, before=write_inputs)
        if i >= warmup:
            times.append(t)
    return statistics.median(times)


def environment() -> dict:
    from importlib import metadata

    def ver(d):
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            return None

    # The device host receives a copy of the work tree without .git: VBS_COMMIT names it.
    commit = os.environ.get("VBS_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            commit = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": ver("vllm"),
        "flashinfer": ver("flashinfer-python"),
        "nvidia_cutlass_dsl": ver("nvidia-cutlass-dsl"),
        "commit": commit,
    }


def run_topk_bench(
    *,
    batches=DEFAULT_BATCHES,
    ns=DEFAULT_NS,
    k: int = 2048,
    l2_modes=("hot", "cold"),
    preset: str = "middle_layers",
    iters: int = 50,
    warmup: int = 10,
    kernels: list[str] | None = None,
    with_gvr: bool = True,
    gvr_configs=("auto",),
) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("vbs bench topk needs a CUDA GPU")
    if preset not in DSA_TRACE_PRESETS:
        raise ValueError(f"preset must be one of {sorted(DSA_TRACE_PRESETS)}, got {preset!r}")
    params = DsaTraceParams(query_drift=DSA_TRACE_PRESETS[preset])
    rows_out = []
    for n in ns:
        # One trace per N at the largest batch; smaller batches use its first rows.
        prev, cur = dsa_decode_trace(max(batches), n, 2, params, device="cuda")
        for b in batches:
            src = cur[:b].contiguous()
            lens = torch.full((b, 1), n, dtype=torch.int32, device="cuda")
            prev_topk = torch.topk(prev[:b], k, dim=1).indices
            cur_top = torch.topk(src, k, dim=1)
            overlap = topk_overlap(prev_topk, cur_top.indices)
            want_sorted = torch.sort(cur_top.values, 1).values  # every kernel is checked against it
            x = torch.empty_like(src)
            candidates = dict(gvr_kernels(k, prev_topk, n, gvr_configs)) if with_gvr else {}
            candidates.update(topk_kernels(b, k))
            candidates["dispatch_true_hint"] = dispatch_kernel(k, prev_topk)
            for name, fn in candidates.items():
                if kernels and name not in kernels:
                    continue
                out = torch.full((b, k), -1, dtype=torch.int32, device="cuda")
                x.copy_(src)
                try:
                    fn(x, lens, out)
                except ValueError as e:
                    if not name.startswith("gvr_"):
                        raise
                    # A GVR variant that cannot hold rows this long (a cluster too small).
                    print(json.dumps({"kernel": name, "batch": b, "n": n, "skipped": str(e)}), flush=True)
                    continue
                torch.cuda.synchronize()
                why = inexact_reason(src, out, k, want_sorted)
                row = {"kernel": name, "batch": b, "n": n, "k": k, "overlap": round(overlap, 4), "exact": why is None}
                if why:
                    row["inexact_reason"] = why
                for l2 in l2_modes:
                    row[f"us_{l2}"] = round(time_kernel(fn, x, src, lens, out, l2=l2, iters=iters, warmup=warmup), 2)
                rows_out.append(row)
                print(json.dumps(row), flush=True)
    return {
        "benchmark": "topk",
        "environment": environment(),
        "params": {"k": k, "preset": preset, "gvr_configs": list(gvr_configs), "trace": asdict(params), "iters": iters, "warmup": warmup,
                   "l2_modes": list(l2_modes), "timing": "CUDA events, median µs, kernel alone"},
        "results": rows_out,
    }


def markdown_table(result: dict, l2: str = "hot") -> str:
    """One line per (batch, N): µs of every kernel, and vLLM's choice over each."""
    rows = result["results"]
    names = list(dict.fromkeys(r["kernel"] for r in rows))
    by = {(r["batch"], r["n"], r["kernel"]): r for r in rows}
    head = "| B | N | overlap | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (3 + len(names))]
    for b, n in dict.fromkeys((r["batch"], r["n"]) for r in rows):
        cells = []
        for name in names:
            r = by.get((b, n, name))
            cells.append("—" if r is None else f"{r[f'us_{l2}']:.1f}" + ("" if r["exact"] else " (inexact)"))
        ov = next(r["overlap"] for r in rows if r["batch"] == b and r["n"] == n)
        lines.append(f"| {b} | {n // 1024}K | {ov:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args) -> int:
    if not torch.cuda.is_available():
        print("vbs bench topk: no CUDA device here; the benchmark times GPU kernels and needs an sm90/sm100 GPU.")
        return 2
    result = run_topk_bench(
        batches=args.batches, ns=args.ns, k=args.k, l2_modes=args.l2, preset=args.preset, iters=args.iters,
        warmup=args.warmup, kernels=args.kernels, gvr_configs=args.gvr_configs,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for l2 in args.l2:
        print(f"\n{l2} L2, k = {args.k}, µs (median of {args.iters}):\n" + markdown_table(result, l2))
    print(f"\nwrote {out}")
    return 0
