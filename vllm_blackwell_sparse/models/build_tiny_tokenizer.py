"""Rebuild the tiny Llama's tokenizer from ``tiny_llama/corpus.txt`` (offline, deterministic).

    python -m vllm_blackwell_sparse.models.build_tiny_tokenizer

Writes ``tokenizer.json``, ``tokenizer_config.json`` and sets ``vocab_size`` in
``config.json`` to the trained vocabulary, so every id the model can emit decodes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

MODEL_DIR = Path(__file__).resolve().parent / "tiny_llama"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 = config's bos/eos
VOCAB_SIZE = 1024


def build(model_dir: Path = MODEL_DIR) -> int:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(model_dir / "corpus.txt")], trainer)
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 32768,
                "clean_up_tokenization_spaces": False,
            },
            indent=1,
        )
        + "\n"
    )
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["vocab_size"] = tok.get_vocab_size()
    cfg_path.write_text(json.dumps(cfg, indent=1) + "\n")
    return tok.get_vocab_size()


if __name__ == "__main__":
    print("vocab_size", build())
