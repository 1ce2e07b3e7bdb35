"""Fingerprints of the machine code of every default kernel variant, built on the CPU.

    python benchmarks/sass_fingerprint.py --arch sm_90a --out /tmp/before.json
    ... change the code ...
    python benchmarks/sass_fingerprint.py --arch sm_90a --out /tmp/after.json --compare /tmp/before.json

CuTe DSL compiles without a GPU (fake tensors) down to a cubin; with ``CUTE_DSL_KEEP=cubin``
it leaves the cubin in ``CUTE_DSL_DUMP_DIR``. For each variant this records the SHA-256 and
size of every code section (``.text.*``) of its cubin: the SASS, without the kernel's
symbol name (which follows Python's class path), so a refactor that moves code around
can be checked to leave the machine code byte-identical. ``--compare`` exits 1 on any
difference.
"""

import argparse
import base64
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = """
import torch
from vllm_blackwell_sparse.kernels import blasst_decode as bd, gvr_topk as gt
V = {}
for d, group, bs, dtype in ((64, 3, 128, torch.bfloat16), (128, 4, 16, torch.bfloat16), (128, 8, 64, torch.float16)):
    for thr, count, final, per_request in ((False, False, False, False), (False, False, True, False),
                                           (True, False, False, False), (True, False, False, True),
                                           (True, True, False, True), (True, True, True, True)):
        V[f"blasst_decode d{d} g{group} bs{bs} {dtype} thr{thr:d} count{count:d} final{final:d} per_request{per_request:d}"] = (
            lambda d=d, group=group, bs=bs, dtype=dtype, thr=thr, count=count, final=final, pr=per_request:
            bd.compile_blasst_decode(head_dim=d, group=group, next_n=1, block_size=bs, dtype=dtype, has_threshold=thr,
                                     count_skips=count, final_output=final, factor_per_request=pr))
    V[f"blasst_combine d{d} {dtype}"] = lambda d=d, dtype=dtype: bd.compile_blasst_combine(head_dim=d, dtype=dtype)
for hint in (True, False):
    for vec in (1, 4):
        V[f"gvr_topk k2048 hint{hint:d} vec{vec}"] = (
            lambda hint=hint, vec=vec: gt.compile_gvr_topk(2048, has_hint=hint, use_row_slot=hint, vec_width=vec))
for cols in (65536, 131072):
    for ctas, threads, smem in gt.default_kernels_for_width(cols):
        if ctas == 1:
            continue
        per = gt.cluster_columns_per_thread(cols, ctas, threads)
        V[f"gvr_topk_cluster k2048 cols{cols} {ctas}x{threads} smem{smem}"] = (
            lambda per=per, ctas=ctas, threads=threads, smem=smem: gt.compile_gvr_topk_cluster(
                2048, has_hint=True, use_row_slot=True, per_thread=per, ctas_per_row=ctas, threads=threads,
                smem_per_thread=smem))
"""

WORKER = VARIANTS + """
import json, os, sys
from pathlib import Path
import base64
dump = Path(os.environ["CUTE_DSL_DUMP_DIR"])
out = {}
for name, build in V.items():
    # Variants of one kernel class share the dump's file name: a variant's cubins are the
    # files its compile wrote (new or rewritten), read before the next one overwrites them.
    before = {p: p.stat().st_mtime_ns for p in dump.glob("*.cubin")}
    build()
    new = sorted(p for p in dump.glob("*.cubin") if before.get(p) != p.stat().st_mtime_ns)
    out[name] = [base64.b64encode(p.read_bytes()).decode() for p in new]
    print(name, len(new), flush=True)
Path(sys.argv[1]).write_text(json.dumps(out))
"""


def code_sections(cubin: bytes) -> dict[str, tuple[str, int]]:
    """``{section name: (sha256, size)}`` of the ELF64 code sections (``.text.*``)."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise ValueError("not an ELF64 file")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)

    def header(i):
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize)
        return name, offset, size

    _, str_off, _ = header(shstrndx)
    out = {}
    for i in range(shnum):
        name_off, offset, size = header(i)
        end = cubin.index(b"\0", str_off + name_off)
        name = cubin[str_off + name_off:end].decode()
        if name.startswith(".text."):
            out[name] = (hashlib.sha256(cubin[offset:offset + size]).hexdigest(), size)
    return out


def fingerprint(arch: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, CUTE_DSL_ARCH=arch, CUTE_DSL_KEEP="cubin", CUTE_DSL_DUMP_DIR=tmp,
                   CUTE_DSL_NO_CACHE="1", CUTE_DSL_DISABLE_FILE_CACHING="1")
        listing = Path(tmp) / "variants.json"
        subprocess.run([sys.executable, "-c", WORKER, str(listing)], env=env, check=True, cwd=tmp)
        files = json.loads(listing.read_text())
        out = {}
        for name, blobs in files.items():
            # Code sections only, named by position: their names carry the kernel's mangled symbol.
            sections = [v for b in blobs for _, v in sorted(code_sections(base64.b64decode(b)).items())]
            if not sections:
                raise RuntimeError(f"{name}: its compile wrote no cubin (a cache answered?)")
            out[name] = [{"sha256": h, "bytes": n} for h, n in sections]
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sm_90a", choices=("sm_90a", "sm_100a"))
    p.add_argument("--out", required=True)
    p.add_argument("--compare", default=None, help="an earlier --out: exit 1 unless every variant is identical")
    a = p.parse_args()
    result = {"arch": a.arch, "variants": fingerprint(a.arch)}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"{len(result['variants'])} variants -> {a.out}")
    if a.compare:
        before = json.loads(Path(a.compare).read_text())["variants"]
        diff = sorted(k for k in set(before) | set(result["variants"]) if before.get(k) != result["variants"].get(k))
        for k in diff:
            print(f"differs: {k}")
        print("identical" if not diff else f"{len(diff)} of {len(before)} variants differ")
        sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
