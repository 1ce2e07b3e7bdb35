"""GVR top-k kernel on the GPU: exact against torch.topk / the oracle on fresh random rows."""

import random

import pytest
import torch

from vllm_blackwell_sparse.kernels.gvr_topk import gvr_topk
from vllm_blackwell_sparse.reference import topk_reference
from vllm_blackwell_sparse.workloads import ADVERSARIAL_KINDS, adversarial_topk_row


# gvr_topk arguments of the kernel forms the fuzz and the adversarial rows run: one CTA per
# row, 8-CTA clusters with every column in registers, and 8 x 256-thread clusters keeping
# 32 columns per thread in shared memory (rows of 49-64 columns per thread).
KERNELS = {"1": {"ctas_per_row": 1}, "8": {"ctas_per_row": 8},
           "8-smem": {"ctas_per_row": 8, "threads": 256, "smem_per_thread": 32}}


def check_rows(logits, lens, k, out):
    """Per row: k (or all L) valid unique indices then -1; values = torch.topk's as multisets."""
    rows, n = logits.shape
    lens = lens.reshape(-1).long().clamp(0, n)
    valid = out >= 0
    assert torch.equal(valid.sum(1), lens.clamp(max=k)), "wrong number of indices"
    assert bool((out < lens[:, None]).all()), "index outside the row"
    # Valid entries first, then -1.
    assert bool((valid[:, 1:] <= valid[:, :-1]).all())
    idx = torch.where(valid, out.long(), torch.full_like(out.long(), n))
    srt = torch.sort(idx, 1).values
    assert not bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] < n)).any()), "duplicate index"
    col = torch.arange(n, device=logits.device)
    masked = torch.where(col[None] < lens[:, None], logits, torch.full_like(logits, float("-inf")))
    neg = torch.full(out.shape, float("-inf"), device=logits.device)
    got = torch.where(valid, masked.gather(1, out.clamp(min=0).long().clamp(max=n - 1)), neg)
    want = torch.cat([torch.topk(masked, min(k, n), dim=1).values, neg[:, : max(0, k - n)]], dim=1)
    torch.testing.assert_close(torch.sort(got, 1).values, torch.sort(want, 1).values, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("k", [512, 1024, 2048])
def test_fuzz_100k_rows_against_torch_topk(k, kernel):
    """About 10^5 fresh rows per kernel (a third per k): one CTA per row, 8-CTA clusters
    with every column in registers, and 8 x 256-thread clusters keeping 32 of each thread's
    64 columns in shared memory. The cluster kernel needs 16-byte aligned rows, so its
    widths are multiples of 4, up to 256K (up to 128K with the shared-memory share)."""
    seed = random.randrange(1 << 30)
    g = torch.Generator(device="cuda").manual_seed(seed)
    tune = KERNELS[kernel]
    total = 0
    while total < 100_000 // 3 + 1:
        rows = random.choice([1, 7, 64, 1000, 4096])
        if kernel == "1":
            n = random.choice([k // 2, k + 1, 3 * k, 16384, 65536]) if rows <= 1000 else random.choice([k + 1, 3 * k, 8192])
        elif kernel == "8":
            n = random.choice([k // 2, k + 4, 3 * k, 16384, 65536, 100000, 262144]) if rows <= 64 else random.choice(
                [k + 4, 3 * k, 8192, 32768]
            )
        else:  # rows of 49-64 columns per thread (32 of them in shared memory)
            rows = random.choice([1, 7, 64, 200])
            n = 4 * random.randrange(98304 // 4 + 1, 131072 // 4 + 1)
        logits = torch.randn(rows, n, generator=g, device="cuda") * random.choice([1.0, 1e-3, 1e4])
        lens = torch.randint(max(1, n // 2), n + 1, (rows,), generator=g, device="cuda", dtype=torch.int32)
        prev = torch.topk(logits + 0.5 * torch.randn(rows, n, generator=g, device="cuda"), min(k, n), dim=1).indices
        hint = torch.full((rows, k), -1, dtype=torch.int32, device="cuda")
        hint[:, : prev.shape[1]] = prev.int()
        choice = random.choice(["true", "none", "random"])
        if choice == "random":
            hint = torch.randint(-3, n + 5, (rows, k), generator=g, device="cuda", dtype=torch.int32)
        out = gvr_topk(logits, lens, k, hint=None if choice == "none" else hint, **tune)
        check_rows(logits, lens, k, out)
        total += rows
    print(f"seed {seed}: {total} rows")


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("kind", ADVERSARIAL_KINDS)
def test_adversarial_rows_follow_the_tie_rule(kind, kernel):
    """Ties, ±inf, NaN, constant rows, three values, signed zeros; one CTA per row, 8-CTA
    clusters, and 8 x 256-thread clusters with 32 of 64 columns per thread in shared
    memory (100K-column rows, most of them past the row's length: padding columns)."""
    k, n = 512, 100000 if kernel == "8-smem" else 6000
    tune = KERNELS[kernel]
    logits = torch.stack([adversarial_topk_row(kind, n, seed=s) for s in range(6)]).cuda()
    lens = torch.tensor([n, 5000, 600, 513, 512, 100], dtype=torch.int32, device="cuda")
    want = topk_reference(logits, lens, k)
    for hint in (None, torch.randint(0, n, (6, k), device="cuda", dtype=torch.int32), want.clone()):
        out = gvr_topk(logits, lens, k, hint=hint, **tune)
        for r in range(6):
            assert set(out[r].tolist()) == set(want[r].tolist()), (kind, r)


def test_hint_table_row_slot_strided_rows_and_2d_seq_lens():
    k, rows, n = 1024, 8, 20000
    buf = torch.randn(rows, n + 96, device="cuda")
    logits = buf[:, :n]  # row stride n + 96
    lens = torch.full((rows // 2, 2), n, dtype=torch.int32, device="cuda")  # (B, next_n)
    lens[:, 0] -= 1
    table = torch.full((5, k), -1, dtype=torch.int32, device="cuda")
    table[2] = torch.topk(logits[3], k).indices.int()
    row_slot = torch.tensor([-1, 2, 2, 2, 0, -1, 4, 1], dtype=torch.int32, device="cuda")
    out = gvr_topk(logits, lens, k, hint_table=table, row_slot=row_slot)
    check_rows(logits, lens, k, out)
    want = topk_reference(logits.contiguous(), lens, k)
    for r in range(rows):
        assert set(out[r].tolist()) == set(want[r].tolist())


def test_row_slot_outside_the_table_means_no_hint():
    # The DSA hook's slots always lie inside the table; a wrong one must still only cost speed.
    k, rows, n = 512, 6, 9000
    logits = torch.randn(rows, n, device="cuda")
    lens = torch.tensor([n, n - 7, 600, n, 513, n], dtype=torch.int32, device="cuda")
    table = torch.randint(0, n, (3, k), dtype=torch.int32, device="cuda")
    row_slot = torch.tensor([3, 1 << 30, 2, -5, 7, 0], dtype=torch.int32, device="cuda")
    out = gvr_topk(logits, lens, k, hint_table=table, row_slot=row_slot)
    check_rows(logits, lens, k, out)


def test_hintless_call_allocates_nothing_and_captures():
    # With out given, a hint-less call allocates nothing (the unread hint argument is a
    # stand-in, not a lazily created tensor), so it can be captured in a CUDA graph.
    k, rows, n = 1024, 4, 30000
    logits = torch.randn(rows, n, device="cuda")
    lens = torch.full((rows,), n, dtype=torch.int32, device="cuda")
    out = torch.empty(rows, k, dtype=torch.int32, device="cuda")
    gvr_topk(logits, lens, k, hint=torch.full((rows, k), -1, dtype=torch.int32, device="cuda"), out=out)
    torch.cuda.synchronize()
    allocations = torch.cuda.memory_stats()["allocation.all.allocated"]
    gvr_topk(logits, lens, k, out=out)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocations
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gvr_topk(logits, lens, k, out=out)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    torch.cuda.synchronize()
    check_rows(logits, lens, k, out)


def test_deterministic_and_cuda_graph_capturable():
    k, rows, n = 2048, 16, 65536
    logits = torch.randn(rows, n, device="cuda")
    lens = torch.full((rows,), n, dtype=torch.int32, device="cuda")
    hint = torch.topk(logits + 0.3 * torch.randn_like(logits), k, dim=1).indices.int()
    out = torch.empty(rows, k, dtype=torch.int32, device="cuda")
    gvr_topk(logits, lens, k, hint=hint, out=out)  # compile outside the capture
    first = out.clone()
    gvr_topk(logits, lens, k, hint=hint, out=out)
    assert torch.equal(out, first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gvr_topk(logits, lens, k, hint=hint, out=out)
    for _ in range(2):
        logits.copy_(torch.randn_like(logits))
        lens.copy_(torch.randint(k // 2, n + 1, (rows,), device="cuda", dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        check_rows(logits, lens, k, out)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(2, 4096, device="cuda")
    lens = torch.full((2,), 4096, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="k must be one of"):
        gvr_topk(x, lens, 100)
    with pytest.raises(ValueError, match="float32"):
        gvr_topk(x.half(), lens, 512)
    with pytest.raises(ValueError, match="seq_lens"):
        gvr_topk(x, lens.long(), 512)
    with pytest.raises(ValueError, match="row_slot"):
        gvr_topk(x, lens, 512, hint_table=torch.zeros(1, 512, dtype=torch.int32, device="cuda"))


def test_hint_at_the_smallest_values_still_exact():
    """A hint whose window lies below k larger keys (a badly stale hint) must fall back."""
    k, rows, n = 1024, 32, 30000
    logits = torch.randn(rows, n, device="cuda")
    lens = torch.full((rows,), n, dtype=torch.int32, device="cuda")
    worst = torch.topk(-logits, k, dim=1).indices.int()  # the k smallest values of each row
    out = gvr_topk(logits, lens, k, hint=worst)
    check_rows(logits, lens, k, out)


@pytest.mark.parametrize(
    "threads, loads, vec_width",
    [(256, 32, 1), (1024, 16, 1), (1024, 8, 1), (512, 32, 1),
     (512, 2, 4), (512, 4, 4), (512, 8, 4), (1024, 2, 4), (1024, 4, 4), (256, 8, 4), (256, 16, 4)],
)
def test_tunings_are_exact(threads, loads, vec_width):
    seed = random.randrange(1 << 30)
    g = torch.Generator(device="cuda").manual_seed(seed)
    for k, rows, n in ((512, 300, 5000), (2048, 64, 70000), (1024, 8, 1100)):  # n % 4 == 0: both widths apply
        logits = torch.randn(rows, n, generator=g, device="cuda")
        lens = torch.randint(n // 2, n + 1, (rows,), generator=g, device="cuda", dtype=torch.int32)
        hint = torch.topk(logits + 0.4 * torch.randn(rows, n, generator=g, device="cuda"), k, dim=1).indices.int()
        for h in (hint, None):
            out = gvr_topk(logits, lens, k, hint=h, threads=threads, loads_in_flight=loads, vec_width=vec_width)
            check_rows(logits, lens, k, out)
            # The tuning changes nothing: same set, same (column) order as the default.
            assert torch.equal(out, gvr_topk(logits, lens, k, hint=h, vec_width=1)), seed


def test_load_width_is_chosen_by_alignment_and_both_widths_are_exact_on_ties():
    from vllm_blackwell_sparse.kernels.gvr_topk import rows_are_16b_aligned

    k = 1024
    base = torch.randint(-3, 3, (6, 40004), device="cuda").float()  # many ties at the cutoff
    assert rows_are_16b_aligned(base) and not rows_are_16b_aligned(base[:, 1:]) and not rows_are_16b_aligned(base[:, :40003])
    lens = torch.tensor([40004, 39999, 4000, 2047, 40001, 1025], dtype=torch.int32, device="cuda")
    want = topk_reference(base, lens, k)
    for logits in (base, base[:, 1:].contiguous()):  # aligned (width 4 chosen), then width 1
        out = gvr_topk(logits, lens.clamp(max=logits.shape[1]), k)
        ref = want if logits is base else topk_reference(logits, lens.clamp(max=logits.shape[1]), k)
        for r in range(6):
            assert set(out[r].tolist()) == set(ref[r].tolist()), r
    with pytest.raises(ValueError, match="vec_width=4"):
        gvr_topk(base[:, 1:], lens.clamp(max=40003), k, vec_width=4)


@pytest.mark.parametrize(
    "rows, n, route",
    [(8, 70000, "vllm_per_row"), (128, 20000, "vllm_persistent"), (64, 65536, "gvr"), (4, 16384, "gvr"),
     (40, 20000, "gvr")],
)
def test_dispatcher_routes_by_the_crossover_and_stays_exact(rows, n, route):
    from vllm_blackwell_sparse.topk_dispatch import decode_topk

    k = 2048
    base = torch.randn(rows, n + 4, device="cuda")
    # Rows starting 4 bytes past a 16-byte boundary: neither GVR nor vLLM's cooperative and
    # persistent kernels read them (those two stopped with "misaligned address").
    logits = base[:, 1:n + 1] if route == "vllm_per_row" else base[:, :n]
    lens = torch.full((rows, 1), n, dtype=torch.int32, device="cuda")
    hint = torch.topk(logits + 0.3 * torch.randn_like(logits), k, dim=1).indices.int()
    out = torch.full((rows, k), -1, dtype=torch.int32, device="cuda")
    assert decode_topk(logits, lens, k, out, hint=hint) == route
    check_rows(logits, lens, k, out)


def _selects_the_same_columns_as_one_cta(cases, **tune):
    """The cluster kernel with ``tune`` against the one-CTA kernel, for each (k, rows, n)
    of ``cases`` in plain, tied and small-scale rows with a true, no and table hint."""
    seed = random.randrange(1 << 30)
    g = torch.Generator(device="cuda").manual_seed(seed)
    for k, rows, n in cases:
        for scale, ties in ((1.0, False), (1.0, True), (1e-3, False)):
            logits = torch.randn(rows, n, generator=g, device="cuda") * scale
            if ties:
                logits = torch.round(logits * 4)  # many equal values at the cutoff
            lens = torch.randint(k // 2, n + 1, (rows,), generator=g, device="cuda", dtype=torch.int32)
            lens[0] = n
            true = torch.topk(logits + 0.3 * torch.randn(rows, n, generator=g, device="cuda"), k, dim=1).indices.int()
            table = torch.cat([true, torch.randint(-2, n + 2, (2, k), generator=g, device="cuda", dtype=torch.int32)])
            # rows + 2 table rows: slots rows + 2 and rows + 3 lie outside (no hint), -1 is no hint.
            slots = torch.randint(-1, rows + 4, (rows,), generator=g, device="cuda", dtype=torch.int32)
            for kw in ({"hint": true}, {}, {"hint_table": table, "row_slot": slots}):
                out = gvr_topk(logits, lens, k, **tune, **kw)
                check_rows(logits, lens, k, out)
                one_cta = gvr_topk(logits, lens, k, ctas_per_row=1, **kw)
                assert torch.equal(out.sort(1).values, one_cta.sort(1).values), (seed, k, n, list(kw))
                # Deterministic: the same call gives the same row, order included.
                assert torch.equal(out, gvr_topk(logits, lens, k, **tune, **kw))


@pytest.mark.parametrize("threads", [256, 512])
@pytest.mark.parametrize("ctas_per_row", [2, 4, 8, 16])
def test_cluster_kernel_selects_the_same_columns_as_the_one_cta_kernel(ctas_per_row, threads):
    """Both kernels keep the columns above the k-th value and the lowest-index ties: the
    same set of columns (the order inside an output row differs), for every register
    share size, hint kind and row length."""
    cap = ctas_per_row * threads * 64
    cases = ((512, 40, 4000), (2048, 16, min(cap, 40000)), (1024, 8, min(cap, 100000)), (2048, 3, cap))
    _selects_the_same_columns_as_one_cta(cases, ctas_per_row=ctas_per_row, threads=threads)


@pytest.mark.parametrize("smem_per_thread", [16, 32])
def test_cluster_kernel_with_columns_in_shared_memory_selects_the_same_columns(smem_per_thread):
    """The same with part of each thread's columns kept in shared memory (8 CTAs of 256
    threads; rows of 48 or 64 columns per thread for 32 of them in shared memory, of 32 or
    more for 16), padding columns included."""
    cases = ((2048, 16, 131072), (512, 5, 100000), (1024, 3, 131068))
    if smem_per_thread == 16:
        cases += ((2048, 8, 40000), (1024, 4, 65536))
    _selects_the_same_columns_as_one_cta(cases, ctas_per_row=8, threads=256, smem_per_thread=smem_per_thread)


def test_cluster_kernel_is_the_default_where_it_fits_and_refuses_what_it_cannot_hold():
    from vllm_blackwell_sparse.kernels.gvr_topk import default_kernel

    x = torch.randn(4, 262148, device="cuda")
    lens = torch.full((4,), 1000, dtype=torch.int32, device="cuda")
    assert default_kernel(4, 262144, True)[0] > 1 and default_kernel(4, 262148, True)[0] == 1
    with pytest.raises(ValueError, match="ctas_per_row"):
        gvr_topk(x, lens, 512, ctas_per_row=8)  # wider than the cluster kernel holds
    with pytest.raises(ValueError, match="ctas_per_row"):
        gvr_topk(x[:, 1:100001], lens, 512, ctas_per_row=8)  # rows not 16-byte aligned
    with pytest.raises(ValueError, match="ctas_per_row"):
        gvr_topk(x[:, :4096], lens, 512, ctas_per_row=3)
    check_rows(x, lens, 512, gvr_topk(x, lens, 512))  # the default falls back to one CTA per row
