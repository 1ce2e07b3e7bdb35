"""The evaluation texts, prompts and statistics (plain Python: no vLLM, no torch).

Text: the Python documentation's topic pages that every Python installation carries
(``pydoc_data/topics.py``, PSF License 2.0): ~465K characters of English technical prose,
~113K SmolLM2 tokens. Windows of a length are spread evenly over the text (at 8K they
overlap: say so where it matters); calibration uses the first half, its held-back check
the second.
"""

from __future__ import annotations

import math
import random
import statistics

CORPUS_NAME = "Python documentation topics (pydoc_data/topics.py, PSF License 2.0)"

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"


def corpus_text() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def windows(ids: list[int], length: int, count: int, part: tuple[float, float] = (0.0, 1.0)) -> list[list[int]]:
    """``count`` windows of ``length`` tokens spread evenly over ``ids[part]``."""
    lo, hi = int(len(ids) * part[0]), int(len(ids) * part[1])
    span = hi - lo
    if span < length:
        raise ValueError(f"the text has {span} tokens in this part, a window needs {length}")
    if count == 1:
        return [ids[lo:lo + length]]
    step = (span - length) / (count - 1)
    return [ids[lo + int(i * step): lo + int(i * step) + length] for i in range(count)]


def window_overlap(n_tokens: int, length: int, count: int) -> float:
    """Share of a window that the next one repeats (0 when they are disjoint)."""
    if count <= 1:
        return 0.0
    step = (n_tokens - length) / (count - 1)
    return max(0.0, 1.0 - step / length)


def passkey_trials(length: int, trials: int, depths: list[float], seed: int) -> list[dict]:
    """``trials`` passkey tasks of one length, spread over ``depths`` (0 = start, 1 = end):
    ``{"depth", "key"}`` (a 5-digit key); :func:`passkey_user_message` builds the text."""
    rng = random.Random(seed * 1000003 + length)
    out = []
    for i in range(trials):
        depth = depths[i % len(depths)]
        out.append({"depth": depth, "key": str(rng.randrange(10000, 100000))})
    return out


def passkey_user_message(key: str, n_filler: int, depth: float) -> str:
    at = round(depth * n_filler)
    parts = [PASSKEY_FILLER] * n_filler
    parts.insert(at, PASSKEY_NEEDLE.format(key=key))
    return PASSKEY_INTRO + "\n\n" + " ".join(parts) + "\n\n" + PASSKEY_QUESTION


def passkey_found(key: str, answer: str) -> bool:
    return key in answer.replace(",", "").replace(" ", "")


def mean_ci(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation confidence interval."""
    if not values:
        return math.nan, math.nan
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan
    return m, z * statistics.stdev(values) / math.sqrt(len(values))


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """Proportion with its Wilson score interval ``(p, low, high)``."""
    if n == 0:
        return math.nan, math.nan, math.nan
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return p, max(0.0, centre - half), min(1.0, centre + half)


def loglik_summary(per_seq: list[list[float]], reference: list[list[float]] | None = None) -> dict:
    """Per-token log-likelihood statistics over sequences (each a list of token logprobs):
    mean log-likelihood per token with its CI over sequences, perplexity (and its CI), and,
    against ``reference`` (the same tokens scored by another configuration), the mean
    paired Δ per token with its CI."""
    seq_means = [statistics.fmean(s) for s in per_seq if s]
    m, half = mean_ci(seq_means)
    out = {"tokens": sum(len(s) for s in per_seq), "sequences": len(seq_means), "mean_logprob": m,
           "mean_logprob_ci95": half, "perplexity": math.exp(-m) if seq_means else math.nan,
           "perplexity_ci95": [math.exp(-(m + half)), math.exp(-(m - half))] if seq_means and half == half else None}
    if reference is not None:
        diffs = [statistics.fmean(a) - statistics.fmean(b) for a, b in zip(per_seq, reference) if a and b]
        dm, dh = mean_ci(diffs)
        out.update(delta_logprob=dm, delta_logprob_ci95=dh,
                   max_abs_token_delta=max((abs(x - y) for a, b in zip(per_seq, reference) for x, y in zip(a, b)),
                                           default=0.0))
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Greedy token agreement: share of equal positions, and the mean first divergence."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(max(len(ra), len(rb)) for ra, rb in zip(a, b))
    firsts = []
    for ra, rb in zip(a, b):
        first = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
        firsts.append(first)
    return {"token_match": same / total if total else 1.0, "identical_sequences": sum(
        ra == rb for ra, rb in zip(a, b)), "sequences": len(a),
        "mean_first_divergence": statistics.fmean(firsts) if firsts else math.nan}
