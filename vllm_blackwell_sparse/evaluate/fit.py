"""Fits of the decode skipped fraction against the threshold scale factor (plain Python).

Measured points ``(factor, kv_len, sparsity)``; only points where skipping is possible
(λ = factor / kv_len < 1) and something was skipped (0 < sparsity < 1) are fitted. Each
form is a straight line after a transform of the sparsity ``s``, against ``ln λ`` for all
lengths at once or against ``ln factor`` per length:

- ``lambda``: ``s = a + b ln λ`` for every length: the paper's inverse relation (if the
  scores' distribution did not change with length, λ alone would set the sparsity);
- ``linear``: ``s = a_L + b_L ln factor`` per length, i.e. ModelOpt's ``factor = a exp(b s)``;
- ``logit``: ``logit s = a_L + b_L ln factor`` per length, i.e. the form proposed in
  ModelOpt #1541, ``factor = a (s / (1 - s))^b``;
- ``power``: ``ln s = a_L + b_L ln factor`` per length, ``s = c factor^b``.

``best`` is the form with the smallest RMS residual in sparsity units. A factor for a
target comes from inverting a form: one factor for all lengths whose predicted sparsity,
averaged over the lengths, is the target (one engine factor serves every length; λ then
falls with length by itself), and one per length for reference.
"""

from __future__ import annotations

import math
import statistics

# transform of s, its inverse
_TRANSFORMS = {
    "identity": (lambda s: s, lambda y: y),
    "log": (math.log, math.exp),
    "logit": (lambda s: math.log(s / (1 - s)), lambda y: 1 / (1 + math.exp(-y))),
}
FORMS = {"lambda": ("identity", False), "linear": ("identity", True), "logit": ("logit", True),
         "power": ("log", True)}  # name: (transform, per length)


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, 0.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def usable(points: list[dict]) -> list[dict]:
    return [p for p in points if p["factor"] < p["kv_len"] and 0.0 < p["sparsity"] < 1.0]


def _rms(r: list[float]) -> float:
    return math.sqrt(statistics.fmean(x * x for x in r)) if r else math.nan


def fit(points: list[dict]) -> dict:
    """``points``: ``{"factor", "kv_len", "sparsity"}``; every form with its coefficients and
    RMS residual (sparsity units), and ``best``."""
    pts = usable(points)
    if len(pts) < 2:
        raise ValueError(f"need at least 2 measured points with 0 < sparsity < 1 and factor < kv_len, got {len(pts)}")
    out: dict = {}
    for name, (tname, per_length) in FORMS.items():
        g, inv = _TRANSFORMS[tname]
        if not per_length:
            a, b = _line([math.log(p["factor"] / p["kv_len"]) for p in pts], [g(p["sparsity"]) for p in pts])
            res = [p["sparsity"] - inv(a + b * math.log(p["factor"] / p["kv_len"])) for p in pts]
            out[name] = {"a": a, "b": b, "rms": _rms(res), "points": len(pts)}
            continue
        lengths, res = {}, []
        for n in sorted({p["kv_len"] for p in pts}):
            mine = [p for p in pts if p["kv_len"] == n]
            if len(mine) < 2:
                continue
            a, b = _line([math.log(p["factor"]) for p in mine], [g(p["sparsity"]) for p in mine])
            lengths[n] = {"a": a, "b": b, "points": len(mine)}
            res += [p["sparsity"] - inv(a + b * math.log(p["factor"])) for p in mine]
        out[name] = {"lengths": lengths, "rms": _rms(res), "points": len(res)}
    candidates = [n for n in FORMS if out[n]["points"] and not math.isnan(out[n]["rms"])]
    out["best"] = min(candidates, key=lambda n: out[n]["rms"])
    return out


def predict(model: dict, factor: float, kv_len: int, form: str | None = None) -> float:
    """Predicted sparsity (clamped to [0, 1]; 0 where λ >= 1). Per-length forms use the
    nearest fitted length (interpolating between lengths would claim more than was measured)."""
    if factor >= kv_len:
        return 0.0
    form = form or model["best"]
    tname, per_length = FORMS[form]
    inv = _TRANSFORMS[tname][1]
    m = model[form]
    if per_length:
        if not m["lengths"]:
            return math.nan
        n = min(m["lengths"], key=lambda x: abs(math.log(int(x) / kv_len)))
        p = m["lengths"][n]
        y = p["a"] + p["b"] * math.log(factor)
    else:
        y = m["a"] + m["b"] * math.log(factor / kv_len)
    return min(1.0, max(0.0, inv(y)))


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
