"""The converted folder's tokenizer, checked against the GGUF file's own tokenizer metadata.

transformers reads a GGUF file's vocabulary into a Hugging Face tokenizer
(``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), and not every version gets Gemma 3's
right: before 5.23 the tokenizer adds no ``<bos>`` to a prompt, and 5.17's, saved and read back,
spells text one character a token. Gemma 3 served with 5.17's tokenizer still answers some
retrieval prompts, but its perplexity on Python source is 69 where it is 4.7 with the right one.
So the tokenizer is checked as it is written (saved, then read back the way vLLM reads it) before
any weight is converted, and a wrong one is refused with the fix.

The checks, on a probe text of English prose and Python code:

- ``<bos>``: added at the start exactly when the GGUF file asks for it
  (``tokenizer.ggml.add_bos_token``), with the file's ``tokenizer.ggml.bos_token_id``;
- vocabulary: as many tokens as the file's ``tokenizer.ggml.tokens``;
- segmentation: at most :data:`MAX_TOKENS_PER_CHAR` tokens a character (both supported models'
  tokenizers use 0.28-0.29 on the probe; one that lost its merges uses 1.0);
- round trip: the saved tokenizer encodes the probe as the one transformers built in memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .gguf_source import GGUFMetadata, ModelsError

__all__ = [
    "MAX_TOKENS_PER_CHAR",
    "MIN_TRANSFORMERS",
    "PROBE",
    "TokenizerSpec",
    "tokenizer_problems",
    "write_tokenizer",
]

MIN_TRANSFORMERS = "5.23"
"""The oldest transformers whose GGUF tokenizers pass every check, for both supported models."""
PROBE = (
    "The quick brown fox jumps over the lazy dog, and the dog does not mind at all.\n"
    "def mean(values):\n"
    "    return sum(values) / len(values)  # the average of a non-empty list\n"
)
MAX_TOKENS_PER_CHAR = 0.5


@dataclass(frozen=True)
class TokenizerSpec:
    """What the GGUF file's metadata says its tokenizer does."""

    add_bos: bool
    bos_id: int | None
    vocab_size: int

    @classmethod
    def from_fields(cls, get: Any) -> TokenizerSpec:
        """From a metadata getter ``get(key, default)`` over the GGUF key/value fields."""
        bos = get("tokenizer.ggml.bos_token_id", None)
        # llama.cpp's default when the key is absent: SentencePiece vocabularies add <bos>
        add_bos = get("tokenizer.ggml.add_bos_token", get("tokenizer.ggml.model", "") == "llama")
        return cls(bool(add_bos), None if bos is None else int(bos),
                   len(get("tokenizer.ggml.tokens", ())))

    @classmethod
    def from_gguf(cls, path: Path) -> TokenizerSpec:
        from gguf import GGUFReader

        return cls.from_fields(GGUFMetadata(GGUFReader(path), path).get)


def _body(ids: list[int], spec: TokenizerSpec) -> list[int]:
    return ids[1:] if spec.add_bos and ids and ids[0] == spec.bos_id else ids


def tokenizer_problems(saved: Any, spec: TokenizerSpec, built: Any = None) -> list[str]:
    """What is wrong with tokenizer ``saved`` (as read back from disk) against ``spec``;
    ``built``: the tokenizer it was saved from, where there is one (the round trip). Empty
    when nothing is."""
    problems = []
    ids = list(saved(PROBE).input_ids)
    starts = bool(ids) and spec.bos_id is not None and ids[0] == spec.bos_id
    if spec.add_bos and not starts:
        problems.append(f"it adds no <bos> (token {spec.bos_id}) at the start of a prompt, which "
                        "the GGUF file asks for (tokenizer.ggml.add_bos_token)")
    if not spec.add_bos and starts:
        problems.append(f"it adds a <bos> (token {spec.bos_id}) the GGUF file does not ask for")
    if len(saved) != spec.vocab_size:
        problems.append(f"it has {len(saved)} tokens, the GGUF vocabulary {spec.vocab_size}")
    body = _body(ids, spec)
    if len(body) > MAX_TOKENS_PER_CHAR * len(PROBE):
        problems.append(f"it splits a {len(PROBE)}-character probe into {len(body)} tokens (at "
                        f"most {int(MAX_TOKENS_PER_CHAR * len(PROBE))} expected: it lost its "
                        "merges)")
    if built is not None and body != _body(list(built(PROBE).input_ids), spec):
        problems.append("saved and read back, it encodes the probe differently from the "
                        "tokenizer it was saved from")
    return problems


def write_tokenizer(gguf: Path, folder: Path, spec: TokenizerSpec | None = None,
                    source: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """Writes the tokenizer of ``gguf`` (or the Hugging Face tokenizer in ``source``) into
    ``folder``; returns it as read back and the record of what it was checked against (for the
    folder's conversion record). Raises :class:`ModelsError` if a check fails. ``spec``: the
    file's tokenizer metadata, read from ``gguf`` when not given."""
    import transformers
    from transformers import AutoTokenizer

    spec = spec or TokenizerSpec.from_gguf(gguf)
    if source is None:
        built = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        what = f"transformers {transformers.__version__}'s tokenizer for {gguf.name}"
        fix = (f"install transformers>={MIN_TRANSFORMERS} (pip install "
               f"'transformers>={MIN_TRANSFORMERS}'), or give --tokenizer a folder holding the "
               "model's Hugging Face tokenizer")
    else:
        try:
            built = AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError) as e:
            raise ModelsError(f"--tokenizer {source}: no Hugging Face tokenizer there ({e})") from e
        what = f"the tokenizer in {source}"
        fix = "give --tokenizer the tokenizer of this model, or leave it out"
    built.save_pretrained(str(folder))
    saved = AutoTokenizer.from_pretrained(str(folder))
    problems = tokenizer_problems(saved, spec, built)
    if problems:
        raise ModelsError(f"{what} is wrong: {'; '.join(problems)}. Fix: {fix}")
    made_by = f"transformers {transformers.__version__}" if source is None else str(source)
    return saved, {**asdict(spec), "made_by": made_by}

