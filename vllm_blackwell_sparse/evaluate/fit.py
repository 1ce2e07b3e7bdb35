"""Fits of the decode skipped fraction against the threshold scale factor (plain Python).

Measured points ``(factor, kv_len, sparsity)``; only points with skipping possible
(λ = factor / kv_len < 1) and something skipped (0 < sparsity < 1) are fitted. Two forms:

- ``lambda``: one line in ln λ for every length, ``s = a + b ln(factor / kv_len)`` -- the
  paper's inverse relation (the threshold is factor / kv_len, so if the scores'
  distribution did not change with length, λ alone would set the sparsity).
- ``per_length``: ``s = a_L + b_L ln(factor)`` for each length, i.e. ModelOpt's
  ``factor = a exp(b s)`` fitted per length.

``best`` is the form with the smaller RMS residual. A factor for a target sparsity comes
from inverting the chosen form (per length, and one factor for all lengths that meets
the target on average, as one engine factor serves every length).
"""

from __future__ import annotations

import math
import statistics


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, 0.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def usable(points: list[dict]) -> list[dict]:
    return [p for p in points if p["factor"] < p["kv_len"] and 0.0 < p["sparsity"] < 1.0]


def fit(points: list[dict]) -> dict:
    """``points``: ``{"factor", "kv_len", "sparsity"}``. Returns both forms with residuals."""
    pts = usable(points)
    if len(pts) < 2:
        raise ValueError(f"need at least 2 measured points with 0 < sparsity < 1 and factor < kv_len, got {len(pts)}")
    xs = [math.log(p["factor"] / p["kv_len"]) for p in pts]
    a, b = _line(xs, [p["sparsity"] for p in pts])
    lam_res = [p["sparsity"] - (a + b * x) for p, x in zip(pts, xs)]
    per = {}
    res = []
    for n in sorted({p["kv_len"] for p in pts}):
        mine = [p for p in pts if p["kv_len"] == n]
        if len(mine) < 2:
            continue
        al, bl = _line([math.log(p["factor"]) for p in mine], [p["sparsity"] for p in mine])
        per[n] = {"a": al, "b": bl, "points": len(mine)}
        res += [p["sparsity"] - (al + bl * math.log(p["factor"])) for p in mine]
    rms = lambda r: math.sqrt(statistics.fmean(x * x for x in r)) if r else math.nan  # noqa: E731
    out = {"lambda": {"a": a, "b": b, "rms": rms(lam_res), "points": len(pts)},
           "per_length": {"lengths": per, "rms": rms(res), "points": len(res)}}
    out["best"] = "per_length" if per and rms(res) < rms(lam_res) else "lambda"
    return out


def predict(model: dict, factor: float, kv_len: int, form: str | None = None) -> float:
    """Predicted sparsity (clamped to [0, 1]; 0 where λ >= 1)."""
    if factor >= kv_len:
        return 0.0
    form = form or model["best"]
    if form == "per_length":
        lengths = model["per_length"]["lengths"]
        if lengths:
            # The nearest fitted length (ln-interpolation between neighbours would overstate
            # what was measured).
            n = min(lengths, key=lambda m: abs(math.log(int(m) / kv_len)))
            p = lengths[n]
            return min(1.0, max(0.0, p["a"] + p["b"] * math.log(factor)))
    lam = model["lambda"]
    return min(1.0, max(0.0, lam["a"] + lam["b"] * math.log(factor / kv_len)))


def factor_for(model: dict, target: float, lengths: list[int], form: str | None = None) -> float | None:
    """The one factor whose predicted sparsity, averaged over ``lengths``, is ``target``
    (bisection in ln factor over [1e-3, min(lengths))); None when it cannot be reached."""
    lo, hi = math.log(1e-3), math.log(min(lengths)) - 1e-9
    mean = lambda lf: statistics.fmean(predict(model, math.exp(lf), n, form) for n in lengths)  # noqa: E731
    s_lo, s_hi = mean(lo), mean(hi)
    increasing = s_hi >= s_lo
    if not (min(s_lo, s_hi) <= target <= max(s_lo, s_hi)):
        return None
    for _ in range(80):
        mid = (lo + hi) / 2
        if (mean(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def reachable(points: list[dict]) -> dict:
    """The highest sparsity measured at each length (what a target can hope for there)."""
    best: dict[int, float] = {}
    for p in points:
        best[p["kv_len"]] = max(best.get(p["kv_len"], 0.0), p["sparsity"])
    return best
