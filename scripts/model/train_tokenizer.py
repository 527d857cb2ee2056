"""Train the byte-level BPE tokenizer of the tiny test model.

Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into the
model folder, so that ``transformers.AutoTokenizer.from_pretrained(folder)`` and vLLM load it.
``<|endoftext|>`` (id 0) is BOS, EOS and pad; encoding a text prepends it, as in training
where every window starts with it::

    python train_tokenizer.py --corpus WORK/data --out WORK/model --vocab-size 4096
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from build_corpus import EOS_TOKEN, read_manifest

log = logging.getLogger("train_tokenizer")

MODEL_MAX_LENGTH = 32768


def sample_docs(corpus_dir: Path, sample_chars: int) -> Iterator[str]:
    """An evenly strided sample of the training documents, about ``sample_chars`` in total."""
    total = read_manifest(corpus_dir)["chars"]["train"]
    keep_every = max(1, round(total / max(1, sample_chars)))
    with open(corpus_dir / "docs_train.jsonl", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i % keep_every == 0:
                yield json.loads(line)


def build_tokenizer(texts: Iterator[str], vocab_size: int):
    """Train a byte-level BPE; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level with no normaliser and no prefix space: decode(encode(x)) == x for any text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    eos = tok.token_to_id(EOS_TOKEN)
    if eos != 0:
        raise RuntimeError(f"{EOS_TOKEN} got id {eos}, expected 0")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{EOS_TOKEN} $A",
                pair=f"{EOS_TOKEN} $A {EOS_TOKEN} $B",
                special_tokens=[(EOS_TOKEN, eos)],
            ),
        ]
    )
    return tok


def save_tokenizer(tok, out_dir: Path) -> None:
    """Write the files transformers and vLLM read, with a class every version knows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
        # NOTE: the default clean-up would turn "x ." into "x." and break round trips of code.
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            "0": {
                "content": EOS_TOKEN,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        },
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def train_tokenizer(
    corpus_dir: Path, out_dir: Path, vocab_size: int = 4096, sample_chars: int = 20_000_000
) -> dict:
    t0 = time.time()
    tok = build_tokenizer(sample_docs(corpus_dir, sample_chars), vocab_size)
    save_tokenizer(tok, out_dir)
    info = {"vocab_size": tok.get_vocab_size(), "seconds": round(time.time() - t0, 2)}
    log.info("trained a %d-token BPE in %.1fs -> %s", info["vocab_size"], info["seconds"], out_dir)
    return info


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="data folder from build_corpus")
    ap.add_argument("--out", type=Path, required=True, help="model folder to write into")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--sample-chars", type=float, default=20e6)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train_tokenizer(args.corpus, args.out, args.vocab_size, int(args.sample_chars))


if __name__ == "__main__":
    main()
