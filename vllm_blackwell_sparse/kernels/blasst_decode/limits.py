"""The BLASST decode kernel's limits and constants: what it can run (plain Python and torch;
importing this builds nothing)."""

import torch

KV_TILE = 16  # keys per tile: the unit of the skip decision
Q_TILE_ROWS = 8  # packed query rows per warp (MMA rows 0-7; rows 8-15 are padding)
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
MAX_NEXT_N = 8  # query tokens per request (spec decode verifies next_n - 1 drafts)
# Resident one-warp CTAs per SM the kernel is built for (the batch-dependent split
# heuristic counts on it), passed to ptxas as the occupancy hint: that allows up to 255 registers. Without
# any hint ptxas capped some variants (d 128, group 8, page 64, no threshold) at 168
# registers and spilled, and ran 25-30% slower.
RESIDENT_WARPS_PER_SM = 8
DEFAULT_MIN_WARPS_PER_SM = RESIDENT_WARPS_PER_SM
DEFAULT_K_STAGES = 2  # depth of each warp's shared-memory K ring (K tiles in flight); 2 measured best on the H200
MAX_K_STAGES = 8
LOG2E = 1.4426950408889634
MAX_LONG_SPLIT_RATIO = 64  # keeps the kernel's 32-bit tile arithmetic far from overflow
MAX_SPLITS = 256  # split-KV ranges per (request, KV head); the combine reads one LSE per thread
COMBINE_THREADS = MAX_SPLITS
TIMELINE_STAMPS = 8  # int32 per CTA written by the timeline variant (decode_kernel.BlasstDecode)
COMBINE_LOADS = 8  # 16-byte partial loads per thread in flight at once in the combine


def check_static(head_dim, group, next_n, block_size, dtype):
    """Raise ValueError naming the argument when the kernel cannot build this shape."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    if not 1 <= next_n <= MAX_NEXT_N:
        raise ValueError(f"next_n (query tokens per request) must be in [1, {MAX_NEXT_N}], got {next_n}")
    if group < 1:
        raise ValueError(f"the GQA group (num_q_heads / num_kv_heads) must be >= 1, got {group}")
    if block_size % KV_TILE:
        raise ValueError(f"block_size must be a multiple of {KV_TILE}, got {block_size}")


def can_implement(head_dim, group, next_n, block_size, dtype) -> str | None:
    """None when the kernel runs this shape, else why not."""
    try:
        check_static(head_dim, group, next_n, block_size, dtype)
    except ValueError as e:
        return str(e)
    return None
