"""``vbs eval`` and ``vbs calibrate``: drive one engine process per backend, write JSON,
a markdown table beside it and a PNG (see ``engine`` for the method)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from vllm_blackwell_sparse.evaluate import tasks
from vllm_blackwell_sparse.evaluate.engine import EvalEngineSpec

# The factor a CUSTOM engine starts with: it selects the BLASST kernel (λ >= 1 at every
# length, so nothing is skipped until the sweep writes a factor into the buffer).
START_FACTOR = 1e9


def engine_env(spec: EvalEngineSpec) -> dict:
    from vllm_blackwell_sparse.bench.engine_process import engine_environment

    if spec.backend == "CUSTOM":  # counters on, read by the worker itself (logged once an hour at most)
        return engine_environment(START_FACTOR, stats_interval=3600)
    return engine_environment()


def run_engine_subprocess(spec: EvalEngineSpec, timeout: float, log=print) -> dict:
    from vllm_blackwell_sparse.bench.engine_process import run_json_worker

    def on_line(line):
        if line.startswith("  "):
            log(line)

    result = run_json_worker(["vllm_blackwell_sparse.evaluate.engine"], asdict(spec), engine_env(spec), timeout,
                             on_line)
    return {"spec": asdict(spec), **result} if "error" in result else result


def _environment() -> dict:
    from vllm_blackwell_sparse.bench.topk import environment

    return environment()


# --------------------------------------------------------------------------------------
# vbs eval
# --------------------------------------------------------------------------------------


def eval_tasks(lengths, sequences, trials) -> dict:
    return {"loglik": {"lengths": lengths, "sequences": sequences, "scored_tokens": 128, "hand_check": True},
            "passkey": {"lengths": lengths, "trials": trials, "max_tokens": 16},
            "agreement": {"lengths": lengths, "sequences": sequences, "max_tokens": 64}}


def summarize_eval(engines: list[dict]) -> dict:
    """Rows per (configuration, length): Δ log-likelihood vs the control and vs FA3,
    perplexity, passkey, agreement, skipped fraction."""
    fa3 = next((e for e in engines if e.get("spec", {}).get("backend") == "FLASH_ATTN" and "settings" in e), None)
    custom = next((e for e in engines if e.get("spec", {}).get("backend") == "CUSTOM" and "settings" in e), None)
    configs = []
    if fa3:
        configs.append(("FA3 (stock FLASH_ATTN)", None, fa3["settings"][0]["tasks"]))
    if custom:
        for s in custom["settings"]:
            name = "CUSTOM control (nothing skipped)" if s["factor"] is None else f"CUSTOM f{s['factor']:g}"
            configs.append((name, s["factor"], s["tasks"]))
    control = next((t for n, f, t in configs if n.startswith("CUSTOM control")), None)
    fa3_tasks = fa3["settings"][0]["tasks"] if fa3 else None
    rows = []
    for name, factor, t in configs:
        for length in t.get("loglik", {}):
            ll = t["loglik"][length]
            row = {"config": name, "factor": factor, "length": int(length)}
            row["loglik"] = tasks.loglik_summary(ll["logprobs"], control["loglik"][length]["logprobs"] if control else None)
            if fa3_tasks:
                row["loglik_vs_fa3"] = tasks.loglik_summary(ll["logprobs"], fa3_tasks["loglik"][length]["logprobs"])
            if "hand_check" in ll:
                row["hand_check"] = ll["hand_check"]
            pk = t.get("passkey", {}).get(length)
            if pk:
                p, lo, hi = tasks.wilson(sum(pk["found"]), len(pk["found"]))
                by_depth = {}
                for d, ok in zip(pk["depths"], pk["found"]):
                    by_depth.setdefault(str(d), []).append(ok)
                row["passkey"] = {"found": sum(pk["found"]), "trials": len(pk["found"]), "rate": p, "ci95": [lo, hi],
                                  "by_depth": {d: sum(v) / len(v) for d, v in by_depth.items()},
                                  "prompt_tokens": pk["prompt_tokens"], "sparsity": pk.get("sparsity")}
            ag = t.get("agreement", {}).get(length)
            if ag:
                row["agreement"] = {}
                if control:
                    row["agreement"]["vs_control"] = tasks.agreement(ag["tokens"], control["agreement"][length]["tokens"])
                if fa3_tasks:
                    row["agreement"]["vs_fa3"] = tasks.agreement(ag["tokens"], fa3_tasks["agreement"][length]["tokens"])
                row["agreement"]["sparsity"] = ag.get("sparsity")
            row["sparsity"] = ll.get("sparsity")
            row["eligible_tiles"] = ll.get("eligible_tiles")
            rows.append(row)
    return {"rows": rows}


def _model_label(result: dict) -> str:
    """The model and where its weights came from (``vbs model prepare``'s record)."""
    return f"{result['model']} ({(result.get('model_provenance') or {}).get('label', 'source unknown')})"


def eval_markdown(result: dict) -> str:
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}%"

    env = result["environment"]
    lines = [f"Model: {_model_label(result)}; text: {tasks.CORPUS_NAME}; {env.get('gpu')}, commit {env.get('commit')}.",
             "",
             "| config | length | skipped (loglik decode) | Δ logprob/token vs control (95% CI) | vs FA3 | perplexity "
             "| passkey (95% CI) | skipped (passkey) | greedy match vs control / vs FA3 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["summary"]["rows"]:
        ll, lf = r["loglik"], r.get("loglik_vs_fa3", {})
        pk = r.get("passkey")
        ag = r.get("agreement", {})
        d = ll.get("delta_logprob")
        lines.append(
            f"| {r['config']} | {r['length']} | {pct(r['sparsity'])} | "
            + (f"{d:+.4f} ± {ll['delta_logprob_ci95']:.4f}" if d is not None else "–") + " | "
            + (f"{lf['delta_logprob']:+.4f} ± {lf['delta_logprob_ci95']:.4f}" if lf.get("delta_logprob") is not None
               else "–")
            + f" | {ll['perplexity']:.3f} | "
            + (f"{pk['found']}/{pk['trials']} ({100 * pk['ci95'][0]:.0f}–{100 * pk['ci95'][1]:.0f}%)" if pk else "–")
            + f" | {pct(pk.get('sparsity')) if pk else '–'} | "
            + " / ".join(f"{ag[k]['token_match']:.2f}" if k in ag else "–" for k in ("vs_control", "vs_fa3")) + " |")
    hc = [r for r in result["summary"]["rows"] if "hand_check" in r]
    if hc:
        lines += ["", "Decode-path scoring checked against prefill scoring of the same positions "
                      "(`prompt_logprobs`): " + "; ".join(
                          f"{r['config']} at {r['length']}: max |Δ| {r['hand_check']['max_abs_diff']:.4f}, mean "
                          f"{r['hand_check']['mean_abs_diff']:.4f} over {r['hand_check']['positions']} positions"
                          for r in hc) + "."]
    return "\n".join(lines) + "\n"


def eval_plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in result["summary"]["rows"] if r["config"].startswith("CUSTOM")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for length in sorted({r["length"] for r in rows}):
        mine = sorted((r for r in rows if r["length"] == length), key=lambda r: r["sparsity"] or 0)
        xs = [100 * (r["sparsity"] or 0) for r in mine]
        axes[0].errorbar(xs, [r["loglik"]["delta_logprob"] for r in mine],
                         yerr=[r["loglik"]["delta_logprob_ci95"] for r in mine], marker="o", capsize=3,
                         label=f"{length} tokens")
        axes[1].plot([100 * (r["passkey"]["sparsity"] or 0) for r in mine if "passkey" in r],
                     [100 * r["passkey"]["rate"] for r in mine if "passkey" in r], marker="o", label=f"{length} tokens")
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].set_xlabel("decode tiles skipped (%)")
    axes[0].set_ylabel("Δ log-likelihood per token vs nothing skipped")
    axes[1].set_xlabel("decode tiles skipped (%)")
    axes[1].set_ylabel("passkey retrieved (%)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"BLASST decode accuracy on {Path(result['model']).name} (factor labels in the table)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main_eval(args) -> int:
    from vllm_blackwell_sparse.bench.serve import model_provenance, resolve_model

    model = resolve_model(args.model)
    lengths = [int(x) for x in args.lengths]
    factors = [None] + [float(x) for x in args.factors]
    t = eval_tasks(lengths, args.sequences, args.trials)
    specs = [EvalEngineSpec("CUSTOM", "CUSTOM", model, factors=factors, tasks=t)]
    if not args.no_fa3:
        specs.insert(0, EvalEngineSpec("FLASH_ATTN", "FLASH_ATTN", model, factors=[None], tasks=t))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"environment": _environment(), "command": " ".join(sys.argv), "model": model,
              "model_provenance": model_provenance(model), "corpus": tasks.CORPUS_NAME, "engines": []}
    for spec in specs:
        print(f"{spec.name}: starting ({len(spec.factors)} setting(s): {', '.join(map(str, spec.factors))})", flush=True)
        r = run_engine_subprocess(spec, args.engine_timeout)
        if "error" in r:
            print(f"{spec.name}: failed ({r['error']}):\n{r['log_tail']}", file=sys.stderr)
        result["engines"].append(r)
        out.write_text(json.dumps(result, indent=1))
    result["summary"] = summarize_eval(result["engines"])
    out.write_text(json.dumps(result, indent=1))
    md = eval_markdown(result)
    out.with_suffix(".md").write_text(md)
    png = eval_plot(result, out.with_suffix(".png"))
    print(md)
    print(f"wrote {out}, {out.with_suffix('.md')}" + (f", {png}" if png else ""))
    return 0 if all("error" not in e for e in result["engines"]) else 1


# --------------------------------------------------------------------------------------
# vbs calibrate
# --------------------------------------------------------------------------------------


FORM_LABELS = {"lambda": "one line in ln λ (the paper's relation)", "linear": "per length, factor = a·exp(b·s) "
               "(ModelOpt)", "logit": "per length, factor = a·(s/(1−s))^b (ModelOpt #1541)",
               "power": "per length, s = c·factor^b"}


def held_back_mean(target: dict) -> float:
    """The held-back sparsity the way the factor was chosen: the mean over the lengths."""
    cells = target["held_back"].values()
    return sum(r["sparsity"] for r in cells) / len(cells)


def calibrate_markdown(result: dict) -> str:
    cal = result["calibration"]
    lengths = sorted({p["kv_len"] for p in cal["points"]})
    lines = [f"Model: {_model_label(result)}; decode skipped fraction on {tasks.CORPUS_NAME} (calibration: first half; "
             "held back: second half).", "",
             "| factor | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for f, cells in cal["grid"].items():
        lines.append(f"| {float(f):g} | " + " | ".join(f"{100 * cells[str(n)]['sparsity']:.1f}%" for n in lengths) + " |")
    fitm = cal["fit"]
    forms = [n for n in ("lambda", "linear", "logit", "power") if n in fitm]
    lines += ["", "Fits (RMS residual, points of sparsity): " + "; ".join(
        f"{FORM_LABELS[n]} {100 * fitm[n]['rms']:.1f}" for n in forms) + f"; used: **{fitm['best']}**.", "",
        "| target | factor | held-back skipped, mean over lengths | per length | all tiles | within ±5 points |",
        "|---|---|---|---|---|---|"]
    for t in cal["targets"]:
        if t["factor"] is None:
            lines.append(f"| {100 * t['target']:.0f}% | unreachable | – | – | – | – |")
            continue
        per = ", ".join(f"{n}: {100 * r['sparsity']:.1f}%" for n, r in t["held_back"].items())
        got = held_back_mean(t)
        ok = abs(got - t["target"]) <= 0.05
        lines.append(f"| {100 * t['target']:.0f}% | {t['factor']:.4g} | {100 * got:.1f}% | {per} | "
                     f"{100 * t['held_back_sparsity']:.1f}% | {'yes' if ok else 'no'} |")
    lines += ["", "Highest skipped fraction measured per length: " + ", ".join(
        f"{n}: {100 * v:.1f}%" for n, v in sorted(cal["reachable"].items(), key=lambda kv: int(kv[0]))) + "."]
    return "\n".join(lines) + "\n"


def calibrate_plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from vllm_blackwell_sparse.evaluate import fit as fitting

    cal = result["calibration"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for n in sorted({p["kv_len"] for p in cal["points"]}):
        pts = sorted((p for p in cal["points"] if p["kv_len"] == n), key=lambda p: p["factor"])
        line = ax.plot([p["factor"] for p in pts], [100 * p["sparsity"] for p in pts], "o", label=f"{n} tokens")[0]
        fs = [pts[0]["factor"] * (pts[-1]["factor"] / pts[0]["factor"]) ** (i / 50) for i in range(51)]
        ax.plot(fs, [100 * fitting.predict(cal["fit"], f, n) for f in fs], "-", color=line.get_color(), alpha=0.6)
    for t in cal["targets"]:
        if t["factor"]:
            ax.plot([t["factor"]], [100 * held_back_mean(t)], "k*", ms=10)
    ax.set_xscale("log")
    ax.set_xlabel("decode_threshold_scale_factor")
    ax.set_ylabel("decode tiles skipped (%)")
    ax.set_title(f"Calibration on {Path(result['model']).name} (lines: {cal['fit']['best']} fit; "
                 "★ held back, mean over lengths)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main_calibrate(args) -> int:
    from vllm_blackwell_sparse.bench.serve import model_provenance, resolve_model

    if args.phase != "decode":
        print("vbs calibrate: --phase prefill is not available yet: prefill runs dense FA3 (BLASST prefill is "
              "being built; until then prefill_threshold_scale_factor has no effect). Use --phase decode.",
              file=sys.stderr)
        return 2
    model = resolve_model(args.model)
    targets = [float(x) for x in args.target_sparsity.split(",")]
    for t in targets:
        if not 0 < t < 1:
            print(f"vbs calibrate: --target-sparsity values must be fractions in (0, 1), got {t}", file=sys.stderr)
            return 2
    lengths = [int(x) for x in args.lengths]
    cfg = {"lengths": lengths, "factors": [float(x) for x in args.factors], "targets": targets,
           "sequences": args.sequences, "decode_tokens": args.decode_tokens}
    spec = EvalEngineSpec("CUSTOM", "CUSTOM", model, factors=[None], tasks={"calibrate": cfg})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"calibrating on {model}: factors {cfg['factors']} x lengths {lengths}, {args.sequences} windows each",
          flush=True)
    r = run_engine_subprocess(spec, args.engine_timeout)
    if "error" in r:
        print(f"calibration failed ({r['error']}):\n{r['log_tail']}", file=sys.stderr)
        return 1
    result = {"environment": _environment(), "command": " ".join(sys.argv), "model": model,
              "model_provenance": model_provenance(model), "engine": {k: v for k, v in r.items() if k != "settings"},
              "calibration": r["settings"][0]["tasks"]["calibrate"]}
    out.write_text(json.dumps(result, indent=1))
    md = calibrate_markdown(result)
    out.with_suffix(".md").write_text(md)
    png = calibrate_plot(result, out.with_suffix(".png"))
    print(md)
    for t in result["calibration"]["targets"]:
        if t["factor"] is None:
            best = max(result["calibration"]["reachable"].values())
            print(f"warning: target {t['target']:.0%} is beyond what this model reaches at these lengths "
                  f"(at most {best:.0%} measured; skipping stops once the factor reaches kv_len)", file=sys.stderr)
        else:
            print(f"target {t['target']:.0%}: --additional-config '{{\"blackwell_sparse\": "
                  f"{{\"decode_threshold_scale_factor\": {t['factor']:.4g}}}}}'  (or VBS_DECODE_THRESHOLD_SCALE_FACTOR="
                  f"{t['factor']:.4g}); held back: {held_back_mean(t):.1%} skipped (mean over lengths)")
    print(f"wrote {out}, {out.with_suffix('.md')}" + (f", {png}" if png else ""))
    return 0


