"""Synthetic data for tests, demos and benchmarks (no model weights exist here).

Everything is seeded and device-agnostic: the same call gives the same tensors on CPU
and GPU up to the generator's device stream.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from vllm_blackwell_sparse.reference.topk import topk_overlap_counts  # noqa: F401 (also re-exported for callers)


def make_paged_kv(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    extra_blocks: int = 3,
):
    """Random K/V caches ``[num_blocks, block_size, Hkv, D]`` and a block table whose
    block ids are shuffled across requests (so a kernel that ignores the table fails).
    Returns ``(k_cache, v_cache, block_table)``; unused blocks hold random garbage."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-max(n, 1) // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_req) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    width = max(blocks_per_req)
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for b, nb in enumerate(blocks_per_req):
        table[b, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    return k.to(dtype).to(device), v.to(dtype).to(device), table.to(device)


@dataclass
class PeakedAttentionParams:
    """Controls how peaked attention is: scores are N(0, 1) noise (in softmax-scaled
    units) plus ``peak`` on the sink tokens, the local window and the heavy hitters."""

    sink_tokens: int = 4
    window: int = 256
    heavy_hitters: int = 16
    peak: float = 8.0
    seed: int = 0


def peaked_attention_case(
    seq_lens: list[int],
    query_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    params: PeakedAttentionParams | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> dict:
    """Queries plus a paged cache whose attention is peaked in a controllable way.

    Query heads of one KV head share a direction ``u``; keys at the peak positions get
    ``peak * u`` added, so their score (× 1/sqrt(D)) is about ``peak`` above the noise.
    Higher ``peak`` = more negligible tiles = more BLASST skipping at a given factor.
    Returns a dict of the tensors the oracle and kernels take and the parameters.
    """
    p = params or PeakedAttentionParams()
    g = torch.Generator().manual_seed(p.seed)
    k_cache, v_cache, block_table = make_paged_kv(
        seq_lens, num_kv_heads, head_dim, block_size, dtype=torch.float32, seed=p.seed + 1
    )
    grp = num_q_heads // num_kv_heads
    u = torch.nn.functional.normalize(torch.randn(num_kv_heads, head_dim, generator=g), dim=-1)
    total_q = sum(query_lens)
    # Each query: sqrt(D) * u (its group's direction) plus small per-head noise.
    q = math.sqrt(head_dim) * u.repeat_interleave(grp, 0)[None] + 0.3 * torch.randn(total_q, num_q_heads, head_dim, generator=g)
    for b, n in enumerate(seq_lens):
        peaks = set(range(min(p.sink_tokens, n)))
        peaks |= set(range(max(0, n - p.window), n))
        if p.heavy_hitters and n:
            peaks |= set(torch.randint(0, n, (p.heavy_hitters,), generator=g).tolist())
        pos = torch.tensor(sorted(peaks), dtype=torch.int64)
        blk = block_table[b].long()[pos // block_size]
        # score = q·k / sqrt(D) ≈ |q| * peak / sqrt(D) ≈ peak along u.
        k_cache[blk, pos % block_size] += p.peak * u[None]
    cu = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0).tolist()), dtype=torch.int32)
    return {
        "q": q.to(dtype).to(device),
        "k_cache": k_cache.to(dtype).to(device),
        "v_cache": v_cache.to(dtype).to(device),
        "block_table": block_table.to(device),
        "cu_seqlens_q": cu.to(device),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),
        "params": asdict(p),
    }


CASE_TENSORS = ("q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens")


def calibrate_threshold_factor(case: dict, target_sparsity: float, *, iters: int = 40, **oracle_kwargs):
    """The smallest BLASST threshold scale factor at which the oracle skips at least
    ``target_sparsity`` of the eligible tiles of ``case`` (a ``peaked_attention_case``),
    and the oracle's result there; ``(None, result at the largest factor)`` when no
    factor reaches it. For benchmarks that compare kernels at given sparsities.

    Bisection on ``log(factor)`` over ``(0, min kv_len)``: from ``kv_len`` up λ >= 1 and
    nothing is skipped. Skipping a tile leaves the running max lower, so sparsity is not
    guaranteed monotone in the factor; the returned result is always the oracle's own
    at the returned factor, so the reported sparsity is what that factor gives.
    ``oracle_kwargs`` go to ``blasst_attention_reference`` (tile size, splits, order).
    """
    from vllm_blackwell_sparse.reference import blasst_attention_reference

    if not 0.0 < target_sparsity <= 1.0:
        raise ValueError(f"target_sparsity must be in (0, 1], got {target_sparsity}")
    args = [case[name] for name in CASE_TENSORS]

    def run(factor):
        return blasst_attention_reference(*args, threshold_scale_factor=factor, **oracle_kwargs)

    hi = float(case["seq_lens"].min()) * (1.0 - 1e-6)  # λ just below 1 for the shortest request
    best = run(hi)
    if best.sparsity < target_sparsity:
        return None, best
    lo = 1e-6
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        res = run(mid)
        if res.sparsity >= target_sparsity:
            hi, best = mid, res
        else:
            lo = mid
        if hi / lo < 1.0 + 1e-4:
            break
    return hi, best


KV_LAYOUTS = ("NHD", "HND")


def to_kv_layout(cache: torch.Tensor, layout: str) -> torch.Tensor:
    """``cache`` ``[num_blocks, block_size, Hkv, D]`` with the same values, stored
    token-major (``"NHD"``, contiguous) or head-major inside each page (``"HND"``)."""
    if layout == "NHD":
        return cache.contiguous()
    if layout == "HND":
        return cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    raise ValueError(f"layout must be one of {KV_LAYOUTS}, got {layout!r}")


def peaked_decode_batch(
    batch: int,
    seq_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    params: PeakedAttentionParams | None = None,
    *,
    next_n: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    layout: str = "NHD",
) -> dict:
    """A benchmark-sized decode batch with peaked attention, generated on ``device``.

    The same construction as :func:`peaked_attention_case` (attention sinks, a local
    window and heavy hitters whose keys carry ``peak * u`` for the group direction ``u``,
    over a N(0, 1) noise floor), but every request has ``seq_len`` keys, the tensors are
    built on the device in ``dtype`` directly (a B64 x 128K cache is tens of GB), and the
    block table is a random permutation of the pages. ``next_n`` query tokens per request.
    ``layout``: the caches' memory order inside a page, ``"NHD"`` (token-major) or ``"HND"``
    (head-major); either way they are indexed ``[num_blocks, block_size, Hkv, D]``.
    """
    if layout not in KV_LAYOUTS:
        raise ValueError(f"layout must be one of {KV_LAYOUTS}, got {layout!r}")
    p = params or PeakedAttentionParams()
    g = torch.Generator(device=device).manual_seed(p.seed)
    pages = -(-seq_len // block_size)
    num_blocks = batch * pages + 1
    table = torch.randperm(num_blocks, generator=g, device=device)[: batch * pages].to(torch.int32).view(batch, pages)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g, device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=g, device=device, dtype=dtype)
    if layout == "HND":  # same values, head-major pages
        k_cache, v_cache = (to_kv_layout(c, "HND") for c in (k_cache, v_cache))
    u = torch.nn.functional.normalize(torch.randn(num_kv_heads, head_dim, generator=g, device=device), dim=-1)
    grp = num_q_heads // num_kv_heads
    q = math.sqrt(head_dim) * u.repeat_interleave(grp, 0)[None] + 0.3 * torch.randn(
        batch * next_n, num_q_heads, head_dim, generator=g, device=device
    )
    peak_pos = set(range(min(p.sink_tokens, seq_len))) | set(range(max(0, seq_len - p.window), seq_len))
    fixed = torch.tensor(sorted(peak_pos), dtype=torch.int64, device=device)
    bump = (p.peak * u).to(dtype)
    for b in range(batch):
        pos = fixed
        if p.heavy_hitters:
            pos = torch.cat([fixed, torch.randint(0, seq_len, (p.heavy_hitters,), generator=g, device=device)])
        blk = table[b].long()[pos // block_size]
        k_cache[blk, pos % block_size] += bump[None]
    return {
        "q": q.to(dtype),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_table": table,
        "seq_lens": torch.full((batch,), seq_len, dtype=torch.int32, device=device),
        "cu_seqlens_q": torch.arange(0, batch * next_n + 1, next_n, dtype=torch.int32, device=device),
        "params": asdict(p),
    }


def random_topk_rows(rows: int, n: int, *, seed: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """N(0, 1) fp32 logits ``[rows, n]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=g).to(device)


ADVERSARIAL_KINDS = ("ties", "constant", "inf", "nan", "few_values", "signed_zero")


def adversarial_topk_row(kind: str, n: int, *, seed: int = 0) -> torch.Tensor:
    """One fp32 row of ``n`` values that stresses a top-k kernel's corner cases."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # many exact ties around any cutoff
        return torch.randint(0, 64, (n,), generator=g).float() / 8
    if kind == "constant":
        return torch.full((n,), 0.5)
    if kind == "inf":
        x = torch.randn(n, generator=g)
        x[torch.randint(0, n, (max(1, n // 50),), generator=g)] = float("inf")
        x[torch.randint(0, n, (max(1, n // 10),), generator=g)] = float("-inf")
        return x
    if kind == "nan":
        x = torch.randn(n, generator=g)
        x[torch.randint(0, n, (max(1, n // 100),), generator=g)] = float("nan")
        return x
    if kind == "few_values":  # three distinct values, large tie blocks
        return torch.tensor([-1.0, 0.0, 2.0])[torch.randint(0, 3, (n,), generator=g)]
    if kind == "signed_zero":
        x = torch.zeros(n)
        x[torch.rand(n, generator=g) < 0.5] = -0.0
        x[torch.randint(0, n, (n // 4,), generator=g)] = 1.0
        return x
    raise ValueError(f"kind must be one of {ADVERSARIAL_KINDS}, got {kind!r}")


@dataclass
class DsaTraceParams:
    """A synthetic DeepSeek-V3.2 indexer: ``logit[t] = Σ_h w_h · ReLU(q_h · k_t / sqrt(d))``
    with RoPE on the first ``rope_dim`` dims of queries and keys, over consecutive decode
    steps whose queries drift by ``query_drift`` per step (0 = frozen, 1 = fresh each step).
    ``query_drift`` sets the consecutive-step top-k overlap (measure it with
    ``topk_overlap``; the values are recorded with every benchmark result)."""

    n_heads: int = 64
    head_dim: int = 128
    rope_dim: int = 64
    query_drift: float = 0.3
    rope_base: float = 10000.0
    seed: int = 0


def _rope(x: torch.Tensor, pos: torch.Tensor, rope_dim: int, base: float) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of the first ``rope_dim`` dims by ``pos * base^(-2i/rope_dim)``;
    ``pos`` broadcasts against ``x.shape[:-1]``."""
    half = rope_dim // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) * 2 / rope_dim)
    ang = pos.float()[..., None] * freq  # pos broadcasts against x.shape[:-1]
    cos, sin = torch.cos(ang), torch.sin(ang)
    xr = x[..., :rope_dim].reshape(*x.shape[:-1], half, 2)
    a, b = xr[..., 0], xr[..., 1]
    rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(*x.shape[:-1], rope_dim)
    return torch.cat([rot, x[..., rope_dim:]], dim=-1)


# Query drift that gives the paper's two regimes of consecutive-step top-k overlap
# (k = 2048, measured with topk_overlap on CPU): 0.55 -> ~50% at 32K, ~40% at 128K
# (its middle layers: 35-50%); 1.0 -> ~6% at 32K, ~1.5% at 128K (its first layers: ~2%).
DSA_TRACE_PRESETS = {"middle_layers": 0.55, "first_layers": 1.0}


def dsa_decode_trace(
    rows: int,
    n_tokens: int,
    steps: int,
    params: DsaTraceParams | None = None,
    *,
    device: str | torch.device = "cpu",
    rows_per_chunk: int = 8,
):
    """Yield ``steps`` fp32 logits ``[rows, n_tokens]`` of consecutive decode steps.

    The rows share one set of keys (positions ``0..n-1``, as if one long prompt were
    decoded by ``rows`` requests) and each has its own head weights and query, at
    decode position ``n - 1 + step``, drifting between steps. Scores are computed
    ``rows_per_chunk`` rows at a time to bound memory.
    """
    p = params or DsaTraceParams()
    g = torch.Generator(device=device).manual_seed(p.seed)
    scale = p.head_dim**-0.5
    keys = torch.randn(n_tokens, p.head_dim, generator=g, device=device)
    # V3.2 layer-normalises indexer keys: equal norms, so no key is "always on top".
    keys = torch.nn.functional.normalize(keys, dim=-1) * math.sqrt(p.head_dim)
    keys = _rope(keys, torch.arange(n_tokens, device=device), p.rope_dim, p.rope_base)
    w = torch.rand(rows, p.n_heads, generator=g, device=device) / p.n_heads
    q = torch.randn(rows, p.n_heads, p.head_dim, generator=g, device=device)
    keep = math.sqrt(max(0.0, 1.0 - p.query_drift**2))
    for s in range(steps):
        if s:
            q = keep * q + p.query_drift * torch.randn(q.shape, generator=g, device=device)
        qr = _rope(q, torch.full((rows, 1), n_tokens - 1 + s, device=device), p.rope_dim, p.rope_base)
        out = torch.empty(rows, n_tokens, device=device)
        for r0 in range(0, rows, rows_per_chunk):
            r1 = min(rows, r0 + rows_per_chunk)
            scores = torch.relu(torch.einsum("rhd,nd->rhn", qr[r0:r1], keys) * scale)
            out[r0:r1] = torch.einsum("rh,rhn->rn", w[r0:r1], scores)
        yield out


def topk_overlap(prev: torch.Tensor, cur: torch.Tensor) -> float:
    """Mean over rows of |prev ∩ cur| / k for index sets ``[rows, k]`` (-1 entries ignored)."""
    valid = (cur >= 0).sum(dim=1).clamp(min=1).double()
    return float((topk_overlap_counts(prev, cur).double() / valid).sum()) / max(1, prev.shape[0])
