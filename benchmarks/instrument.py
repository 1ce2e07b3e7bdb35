"""Instrumented copies of a kernel module, for the timeline scripts (decode_timeline.py,
topk_timeline.py): the module's source with timer reads spliced in at anchors, imported
from a temporary directory, so the committed kernel is never changed."""

import importlib.util
import pathlib
import tempfile

import numpy as np


def instrumented_copy(module_file: str, edits: list[tuple[str, str]], name: str):
    """Import a copy of ``module_file`` with every ``(anchor, replacement)`` of ``edits``
    applied; each anchor must occur exactly once (else the kernel changed and the edits
    need updating, which this says)."""
    src = pathlib.Path(module_file).read_text()
    for anchor, replacement in edits:
        if src.count(anchor) != 1:
            raise SystemExit(f"{name}: anchor found {src.count(anchor)} times (not once) in {module_file}:\n{anchor}"
                             "(the kernel changed: update the script's edits)")
        src = src.replace(anchor, replacement)
    path = pathlib.Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def unwrap_globaltimer(entry: np.ndarray, exit_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The global timer's low 32 bits (ns, wrapping every 4.3 s) of each CTA's entry and
    exit, unwrapped around the first CTA's entry, each exit after its own entry (int64 ns)."""
    u32 = 1 << 32
    entry, exit_ = entry % u32, exit_ % u32
    entry = entry[0] + (entry - entry[0] + u32 // 2) % u32 - u32 // 2
    return entry, entry + (exit_ - entry) % u32
