"""Imports run one way: tools -> vLLM glue -> kernels, and the torch oracles import
nothing of ours (README, "How the code is organised"). Every import statement counts,
the ones inside functions included."""

import ast
from pathlib import Path

import vllm_blackwell_sparse

PACKAGE = Path(vllm_blackwell_sparse.__file__).parent
TOOLS = {"bench", "evaluate", "cli", "demo", "doctor", "workloads", "models"}
# What each layer may import of ours (besides itself); vLLM only from the glue and the tools.
ALLOWED = {
    "kernels": set(),
    "reference": set(),
    "glue": {"kernels", "reference", "root"},
    "tools": {"glue", "kernels", "reference", "root"},
    "root": {"glue"},
}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] in ("kernels", "reference"):
        return parts[1]
    return "tools" if parts[1] in TOOLS else "glue"


def _module_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "vllm_blackwell_sparse":  # from vllm_blackwell_sparse import dsa
                yield from (f"vllm_blackwell_sparse.{a.name}" for a in node.names if a.name != "__version__")
            else:
                yield node.module


def test_imports_run_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = _module_of(path)
        layer = _layer(mine)
        for target in _imports(path):
            if target == "vllm" or target.startswith("vllm."):
                if layer in ("kernels", "reference"):
                    wrong.append(f"{mine} ({layer}) imports vLLM: {target}")
            elif target.startswith("vllm_blackwell_sparse"):
                other = _layer(target)
                if other != layer and other not in ALLOWED[layer]:
                    wrong.append(f"{mine} ({layer}) imports {target} ({other})")
    assert not wrong, "\n".join(wrong)
