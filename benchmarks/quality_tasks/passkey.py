"""Passkey retrieval at exact token lengths: an lm-eval task generated offline from a tokenizer.

One 7-digit pass key sits at a chosen depth of a long haystack; the prompt ends with "The pass key
is" and the answer is the key. Three variants:

- ``repeat``: the classic passkey filler ("The grass is green. The sky is blue. ...");
- ``code``: lines of the Python standard library's top-level modules, the needle a comment line
  (the kind of text the thresholds are calibrated on);
- ``assign``: the same code haystack, the needle an assignment ``PASS_KEY = "<key>"`` and the
  prompt ending in ``assert PASS_KEY == "``: the answer is copied from far back, the way a code
  model completes a name defined thousands of lines earlier. Small models that do not follow the
  instructions of the other two (Gemma 3 270M) solve this one dense.

Every prompt is exactly ``length - RESERVE`` tokens long under the model's tokenizer, counted the
way lm-eval's ``local-completions`` client sends it (``add_bos_token=True``: the tokenizer's own
special tokens, e.g. Gemma's ``<bos>``), so that ``RESERVE`` tokens are left for the answer within a
server's ``--max-model-len`` of ``length``. Sample ``i`` puts its needle at depth
``DEPTHS[i % 10]`` (5% ... 95% of the haystack) with a key drawn from a generator seeded by
(variant, seed, length, i): the same arguments give the same prompts on any machine with the same
tokenizer (and, for ``code``, the same Python version).

lm-eval loads this file through ``!function passkey.<name>`` in ``sparge_passkey*.yaml``
(``--include_path benchmarks/quality_tasks``); the task reads ``tokenizer`` (a local tokenizer or
model folder, from ``--model_args`` or ``--metadata``), ``max_seq_lengths`` (list of lengths),
``sparge_samples`` (samples per length, default 50) and ``sparge_seed`` (default 0). Nothing here
imports lm-eval or needs the network.
"""

from __future__ import annotations

import bisect
import functools
import glob
import itertools
import os
import random
import re
import sysconfig
from collections.abc import Sequence
from typing import Any

RESERVE = 32  # tokens of a length left for the answer (max_gen_toks 16 plus slack)
DEPTHS = tuple((j + 0.5) / 10 for j in range(10))
DEFAULT_SAMPLES = 50
VARIANTS = ("repeat", "code", "assign")
CODE_VARIANTS = ("code", "assign")  # the standard-library haystack

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
TEMPLATES = {
    "repeat": dict(
        head="There is an important pass key hidden inside a lot of irrelevant text. Find it and "
             "memorize it. I will quiz you about the pass key at the end.\n",
        needle="The pass key is {key}. Remember it. {key} is the pass key.",
        question="\nWhat is the pass key? The pass key is",
        sep=" ", pad=" .",
    ),
    "code": dict(
        head="# There is an important pass key hidden inside the following Python code. Find it "
             "and memorize it.\n# I will quiz you about the pass key at the end.\n",
        needle="# The pass key is {key}. Remember it. {key} is the pass key.",
        question="\n# What is the pass key? The pass key is",
        sep="\n", pad=" .",
    ),
    "assign": dict(
        head="# The pass key is assigned somewhere in the following Python code.\n",
        needle='PASS_KEY = "{key}"',
        question='\n\nassert PASS_KEY == "',
        sep="\n", pad=" #",
    ),
}
_NUMBER = re.compile(r"\d+")


def score(prediction: str, answer: str) -> float:
    """1.0 when the first number in ``prediction`` is ``answer``, else 0.0.

    Stricter than "the answer occurs somewhere": a continuation that lists several numbers does
    not score by chance, and a longer number that contains the key does not count.
    """
    m = _NUMBER.search(prediction or "")
    return 1.0 if m is not None and m.group(0) == str(answer) else 0.0


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval's per-document metric: ``acc`` of the greedy continuation."""
    return {"acc": score(results[0], doc["answer"])}


def stdlib_modules() -> list[str]:
    """The standard library's top-level ``*.py`` modules, sorted (the ``code`` haystack's files)."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


@functools.cache
def code_lines() -> tuple[str, ...]:
    """Every line of :func:`stdlib_modules`, in order, without line ends or trailing blanks."""
    lines: list[str] = []
    for path in stdlib_modules():
        with open(path, encoding="utf-8", errors="replace") as f:
            lines.extend(line.rstrip() for line in f.read().splitlines())
    return tuple(lines)


@functools.cache
def load_tokenizer(name: str) -> Any:
    """The tokenizer lm-eval's API client uses for ``tokenizer=name`` (fast, no remote code)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, use_fast=True)


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` as sent: with the tokenizer's own special tokens (lm-eval
    ``add_bos_token=True``)."""
    return len(tokenizer(text).input_ids)


def _unit_costs(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Tokens of each text on its own (no special tokens): an estimate of what it adds."""
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False).input_ids]


def make_prompt(tokenizer: Any, variant: str, target: int, key: int, depth: float,
                offset: int = 0) -> tuple[str, int]:
    """The prompt of exactly ``target`` tokens with ``key`` at ``depth`` (0..1) of the haystack,
    and its number of haystack units. ``offset``: first code line (``code`` variant).

    The prompt is head + ``n`` haystack units (the needle between unit ``round(depth * n)`` - 1
    and the next) + ``k`` pad units + question. ``n`` comes from the units' token costs counted
    one by one, ``k`` fills the rest; the whole prompt is then tokenized and ``n`` and ``k``
    corrected until the count is exact (the costs of neighbouring units need not add up).
    """
    t = TEMPLATES[variant]
    needle = t["needle"].format(key=key)
    if variant in CODE_VARIANTS:
        lines = code_lines()
        unit = lambda i: lines[(offset + i) % len(lines)]  # noqa: E731
    else:
        unit = lambda i: FILLER[i % len(FILLER)]  # noqa: E731

    def build(n: int, k: int) -> str:
        units = [unit(i) for i in range(n)]
        cut = round(depth * n)
        body = t["sep"].join([*units[:cut], needle, *units[cut:]])
        return t["head"] + body + t["pad"] * k + t["question"]

    fixed = count_tokens(tokenizer, build(0, 0))
    if fixed > target:
        raise ValueError(f"{target} tokens cannot hold the passkey template ({fixed} tokens)")
    cum = [0]  # cum[n]: estimated tokens of the first n units (with their separators)

    def units_within(tokens: int) -> int:
        """The most units whose estimated cost stays within ``tokens``."""
        while cum[-1] <= tokens:
            start = len(cum) - 1
            costs = _unit_costs(tokenizer, [t["sep"] + unit(i) for i in range(start, start + 512)])
            base = cum[-1]
            cum.extend(base + c for c in itertools.accumulate(costs))
        return bisect.bisect_right(cum, tokens) - 1

    # Bracket the most units that fit: lo fits with lo_gap tokens to spare, hi is too long. The
    # estimates propose the next n; the exact count decides.
    lo, lo_gap, hi = 0, target - fixed, None
    n = units_within(target - fixed)
    for _ in range(24):
        if n <= lo or (hi is not None and n >= hi):
            break
        gap = target - count_tokens(tokenizer, build(n, 0))
        if gap < 0:
            hi = n
            n = min(n - 1, units_within(cum[n] + gap))
        else:
            lo, lo_gap = n, gap
            if gap <= 8:
                break
            n = max(n + 1, units_within(cum[n] + gap))
        if hi is not None:
            n = min(n, hi - 1)
        n = max(n, lo + 1)
    for n in range(lo, max(-1, lo - 8), -1):  # fill the rest with pad units, verified
        gap = lo_gap if n == lo else target - count_tokens(tokenizer, build(n, 0))
        if gap <= 0:
            if gap == 0:
                return build(n, 0), n
            continue
        per = max(1, count_tokens(tokenizer, build(n, 1)) - (target - gap))  # tokens per pad
        for k in sorted({max(1, gap // per + d) for d in (0, 1, -1)}):
            if count_tokens(tokenizer, build(n, k)) == target:
                return build(n, k), n
    raise ValueError(f"no prompt of exactly {target} tokens found near {lo} haystack units")


def generate(tokenizer: Any, variant: str, length: int, samples: int = DEFAULT_SAMPLES,
             seed: int = 0) -> list[dict[str, Any]]:
    """``samples`` documents for context ``length``: prompts of ``length - RESERVE`` tokens."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {VARIANTS}")
    target = length - RESERVE
    docs = []
    for i in range(samples):
        rng = random.Random(f"sparge-passkey:{variant}:{seed}:{length}:{i}")
        depth = DEPTHS[i % len(DEPTHS)]
        offset = rng.randrange(len(code_lines())) if variant in CODE_VARIANTS else 0
        in_needle = TEMPLATES[variant]["needle"].count("{key}")
        while True:  # a key that the haystack does not contain by chance
            key = rng.randrange(10**6, 10**7)
            text, units = make_prompt(tokenizer, variant, target, key, depth, offset)
            if text.count(str(key)) == in_needle:  # in the needle, nowhere else
                break
        docs.append(dict(index=i, input=text, answer=str(key), depth=depth, units=units,
                         length=length, max_length=length, prompt_tokens=target,
                         variant=variant, seed=seed))
    return docs


def _tokenizer_name(kwargs: dict[str, Any]) -> str:
    for key in ("tokenizer", "pretrained", "model"):
        value = kwargs.get(key)
        if isinstance(value, str) and value:
            return value
    raise ValueError("the passkey task needs a tokenizer: pass tokenizer=<local model folder> in "
                     "--model_args or --metadata")


def _dataset(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    import datasets

    lengths: Sequence[int] = kwargs.get("max_seq_lengths") or [4096]
    tokenizer = load_tokenizer(_tokenizer_name(kwargs))
    samples = int(kwargs.get("sparge_samples") or DEFAULT_SAMPLES)
    seed = int(kwargs.get("sparge_seed") or 0)
    docs = [d for n in lengths for d in generate(tokenizer, variant, int(n), samples, seed)]
    return {"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)}


def passkey_repeat(**kwargs: Any) -> dict[str, Any]:
    """lm-eval ``custom_dataset`` of ``sparge_passkey``."""
    return _dataset("repeat", kwargs)


def passkey_code(**kwargs: Any) -> dict[str, Any]:
    """lm-eval ``custom_dataset`` of ``sparge_passkey_code``."""
    return _dataset("code", kwargs)


def passkey_assign(**kwargs: Any) -> dict[str, Any]:
    """lm-eval ``custom_dataset`` of ``sparge_passkey_assign``."""
    return _dataset("assign", kwargs)
