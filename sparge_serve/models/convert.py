"""GGUF -> Hugging Face folder: dequantised safetensors, config.json, tokenizer, generation config.

``gguf`` reads and dequantises the tensors; the mapping to Hugging Face names, the undoing of
llama.cpp's storage conventions and config.json are written here:

* Llama: llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` per head for its own
  rope layout (``reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``); the inverse is
  ``reshape(n_head, d/2, 2, ...).swapaxes(1, 2)``.
* Gemma 3: llama.cpp stores every ``*norm.weight`` as ``1 + w`` (its RMSNorm multiplies by the
  stored weight, Hugging Face's Gemma RMSNorm by ``1 + w``), so 1 comes off again. The embedding
  is stored unscaled (both runtimes multiply by sqrt(hidden_size)), q/k are not permuted (Gemma's
  rope is the NeoX layout in both).

The tokenizer comes from transformers' own GGUF tokenizer conversion. config.json takes every
number the GGUF metadata has; the rest are Gemma 3 architecture rules that llama.cpp applies too
(the 5:1 sliding/global layer pattern, 10000 as the sliding layers' rope base, the query scale).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .gguf_source import (
    GGUFMetadata,
    ModelsError,
    ModelSpec,
    Source,
    file_sha256,
    locate,
    spec_for,
)
from .tokenizer import TokenizerSpec, write_tokenizer

__all__ = [
    "DTYPES",
    "PROVENANCE",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TYPES",
    "convert",
    "convert_gguf",
    "read_provenance",
]

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
# Float and the classic / k-quant block types (both shipped files use a mix of these).
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip
DTYPES = ("bfloat16", "float16", "float32")
PROVENANCE = "sparge_model.json"
WEIGHTS = "model.safetensors"


# GGUF tensor name (without "blk.N." and ".weight"/".bias") -> Hugging Face module name.
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_ARCH = {
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?([a-z0-9_]+)\.(weight|bias)$")


def _open(path: Path) -> tuple[Any, GGUFMetadata]:
    """Reads ``path`` and checks its architecture and every tensor's type before any work."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ModelsError(f"{path} is not a readable GGUF file: {e}") from e
    meta = GGUFMetadata(reader, path)
    if meta.arch not in SUPPORTED_ARCHITECTURES:
        raise ModelsError(
            f"{path}: GGUF architecture {meta.arch!r} is not supported; the converter handles "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_TYPES))
    if bad:
        names = [t.name for t in reader.tensors if t.tensor_type.name in bad][:3]
        raise ModelsError(
            f"{path}: tensor type {', '.join(bad)} (e.g. {', '.join(names)}) is not supported; "
            f"the converter dequantises {', '.join(SUPPORTED_TYPES)}"
        )
    return reader, meta


def _rope_parameters(meta: GGUFMetadata, theta: float) -> dict[str, Any]:
    kind = meta.get("{arch}.rope.scaling.type", "none")
    if kind == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        factor = float(meta.get("{arch}.rope.scaling.factor"))
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    raise ModelsError(
        f"{meta.path}: rope scaling {kind!r} is not supported; the converter handles none and linear"
    )


def _layer_types(meta: GGUFMetadata, n_layers: int) -> list[str]:
    """Gemma 3's sliding/global layer pattern: metadata where present, else llama.cpp's rule."""
    pattern = meta.get("{arch}.attention.sliding_window_pattern", None)
    if isinstance(pattern, list):  # one flag per layer, true = sliding window
        if len(pattern) != n_layers:
            raise ModelsError(
                f"{meta.path}: sliding_window_pattern has {len(pattern)} entries for {n_layers} layers"
            )
        return ["sliding_attention" if s else "full_attention" for s in pattern]
    every = int(pattern) if pattern else 6  # llama.cpp's Gemma 3: every 6th layer is global
    return [
        "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers)
    ]


def build_config(meta: GGUFMetadata, n_vocab: int, tied: bool, dtype: str) -> Any:
    """A transformers config for ``meta``'s architecture, every number from the metadata."""
    import torch

    hidden = int(meta.get("{arch}.embedding_length"))
    heads = int(meta.get("{arch}.attention.head_count"))
    kv_heads = int(meta.get("{arch}.attention.head_count_kv", heads))
    head_dim = int(meta.get("{arch}.attention.key_length", hidden // heads))
    if int(meta.get("{arch}.attention.value_length", head_dim)) != head_dim:
        raise ModelsError(f"{meta.path}: key and value head sizes differ, which neither model has")
    n_layers = int(meta.get("{arch}.block_count"))
    theta = float(meta.get("{arch}.rope.freq_base", 10000.0))  # llama.cpp's default
    common = dict(
        vocab_size=int(meta.get("{arch}.vocab_size", n_vocab)),
        hidden_size=hidden,
        intermediate_size=int(meta.get("{arch}.feed_forward_length")),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(meta.get("{arch}.context_length")),
        rms_norm_eps=float(meta.get("{arch}.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings=tied,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", None),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id", None),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id", None),
    )
    if common["vocab_size"] != n_vocab:
        raise ModelsError(
            f"{meta.path}: vocab_size {common['vocab_size']} but token_embd has {n_vocab} rows"
        )
    if meta.arch == "llama":
        from transformers import LlamaConfig

        rope_dims = int(meta.get("{arch}.rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise ModelsError(
                f"{meta.path}: rope covers {rope_dims} of {head_dim} head dimensions; the "
                "converter handles full-width rope only"
            )
        config = LlamaConfig(
            **common,
            hidden_act="silu",
            rope_parameters=_rope_parameters(meta, theta),
            architectures=["LlamaForCausalLM"],
        )
    else:
        from transformers import Gemma3TextConfig

        layer_types = _layer_types(meta, n_layers)
        full = _rope_parameters(meta, theta)
        local = {"rope_type": "default", "rope_theta": float(meta.get("{arch}.rope.freq_base_swa", 10000.0))}
        scale = meta.get("{arch}.attention.scale", None)
        if scale is not None:
            query_scalar = 1.0 / float(scale) ** 2
        else:  # llama.cpp's Gemma 3: 1/sqrt(head_dim), 1/sqrt(hidden/heads) for the 62-layer 27B
            query_scalar = hidden // heads if n_layers == 62 else head_dim
        config = Gemma3TextConfig(
            **common,
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=int(meta.get("{arch}.attention.sliding_window")),
            layer_types=layer_types,
            rope_parameters={"full_attention": full, "sliding_attention": local},
            query_pre_attn_scalar=query_scalar,
            final_logit_softcapping=meta.get("{arch}.final_logit_softcapping", None),
            attn_logit_softcapping=meta.get("{arch}.attn_logit_softcapping", None),
            architectures=["Gemma3ForCausalLM"],
        )
    config.dtype = getattr(torch, dtype)
    return config


def hf_name(arch: str, gguf_name: str) -> str | None:
    """The Hugging Face parameter name of GGUF tensor ``gguf_name``; None when it has none."""
    m = _NAME.match(gguf_name)
    if m is None:
        return None
    block, base, suffix = m.groups()
    if block is None:
        module = _TOP.get(base)
        return None if module is None else f"{module}.{suffix}"
    module = _LAYER.get(base) or _LAYER_ARCH[arch].get(base)
    return None if module is None else f"model.layers.{block}.{module}.{suffix}"


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's per-head row permutation of a q/k projection (weight or bias)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _fix(arch: str, name: str, w: np.ndarray, config: Any) -> np.ndarray:
    if arch == "llama":
        if ".attn_q." in name:
            return unpermute_rope_rows(w, config.num_attention_heads)
        if ".attn_k." in name:
            return unpermute_rope_rows(w, config.num_key_value_heads)
    elif arch == "gemma3" and name.endswith("norm.weight"):
        return w - 1.0
    return w


def _expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the Hugging Face model for ``config`` (built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


@dataclass
class _Result:
    tensors: dict[str, Any]
    config: Any


def _convert_tensors(reader: Any, meta: GGUFMetadata, dtype: str, progress: bool, label: str) -> _Result:
    import torch
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise ModelsError(f"{meta.path}: no token_embd.weight tensor")
    n_vocab = int(by_name["token_embd.weight"].shape[-1])
    config = build_config(meta, n_vocab, "output.weight" not in by_name, dtype)
    expected = _expected_shapes(config)
    unknown = [t.name for t in reader.tensors if hf_name(meta.arch, t.name) not in expected]
    if unknown:
        raise ModelsError(
            f"{meta.path}: tensors {', '.join(unknown[:5])} have no place in "
            f"{config.architectures[0]} (the converter maps the tensors of the supported models only)"
        )
    mapped = {hf_name(meta.arch, t.name) for t in reader.tensors}
    missing = sorted(set(expected) - mapped)
    if missing:
        raise ModelsError(
            f"{meta.path}: the GGUF file lacks tensors for {', '.join(missing[:5])} of "
            f"{config.architectures[0]}"
        )
    out: dict[str, Any] = {}
    tdtype = getattr(torch, dtype)
    for t in tqdm(reader.tensors, desc=f"{label}: dequantising", unit="tensor", disable=not progress):
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy
        w = _fix(meta.arch, t.name, w, config)
        name = hf_name(meta.arch, t.name)
        if tuple(w.shape) != expected[name]:
            raise ModelsError(
                f"{meta.path}: {t.name} dequantises to shape {tuple(w.shape)}, "
                f"{name} needs {expected[name]}"
            )
        out[name] = torch.from_numpy(w).to(tdtype)
    return _Result(out, config)


def read_provenance(folder: Path) -> dict[str, Any] | None:
    """The conversion record in ``folder``, or None when it holds none."""
    try:
        record = json.loads((Path(folder) / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "model" in record else None


def _check_out(out: Path, key: str) -> dict[str, Any] | None:
    """Refuses a non-empty ``out`` unless it holds a previous conversion of ``key``."""
    if out.exists() and not out.is_dir():
        raise ModelsError(f"--out {out} is a file; name a new or empty directory")
    if not out.exists():
        return None
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return None
    record = read_provenance(out)
    if record is not None and record.get("model") == key:
        return record
    held = (
        f"a conversion of {record['model']!r}"
        if record is not None
        else f"files sparge-models did not write ({', '.join(entries[:4])}"
        + (", ..." if len(entries) > 4 else "")
        + ")"
    )
    raise ModelsError(
        f"refusing to write {key} into {out}: it holds {held}. Name a new or empty directory "
        f"(sparge-models replaces only its own earlier conversion of the same model)"
    )


def _generation_config(config: Any, tok: Any, arch: str) -> Any:
    from transformers import GenerationConfig

    eos = [config.eos_token_id] if config.eos_token_id is not None else []
    if arch == "gemma3":  # Gemma's chat turns end with <end_of_turn>, a second stop token
        turn = tok.convert_tokens_to_ids("<end_of_turn>")
        if isinstance(turn, int) and turn != tok.unk_token_id and turn not in eos:
            eos.append(turn)
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        pad_token_id=config.pad_token_id,
    )


def convert_gguf(
    path: Path | str,
    out: Path | str,
    *,
    key: str | None = None,
    dtype: str = "bfloat16",
    progress: bool = True,
    source: dict[str, Any] | None = None,
    tokenizer: Path | str | None = None,
) -> Path:
    """Converts the GGUF file ``path`` into the Hugging Face folder ``out``; returns ``out``.

    ``key`` names the model in the conversion record (default: the GGUF architecture); ``out``
    must be new, empty, or an earlier conversion of the same ``key``. Files are written to a
    sibling staging folder first: an interrupted run creates no ``out``, and an earlier
    conversion keeps its record until every file is replaced (running again completes it).
    ``progress``: a tqdm bar over the tensors and a line per step on stderr. ``tokenizer``: a
    folder with the model's Hugging Face tokenizer, written instead of the one transformers builds
    from the GGUF vocabulary; either is checked against the file's metadata (``tokenizer.py``).
    """
    from safetensors.torch import save_file

    path, out = Path(path), Path(out)
    if dtype not in DTYPES:
        raise ModelsError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if not path.is_file():
        raise ModelsError(f"GGUF file {path} does not exist")
    previous = _check_out(out, key) if key else None  # before reading a large file
    _say(progress, f"reading {path}")
    reader, meta = _open(path)
    if not key:
        key = meta.arch
        previous = _check_out(out, key)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:  # the tokenizer first: its checks refuse a wrong one before minutes of dequantising
        _say(progress, "writing the tokenizer" if tokenizer else
             "converting the tokenizer (transformers reads the GGUF vocabulary)")
        tok, tok_record = write_tokenizer(  # the spec from the metadata already read
            path, stage, TokenizerSpec.from_fields(meta.get),
            source=None if tokenizer is None else Path(tokenizer))
        result = _convert_tensors(reader, meta, dtype, progress, key)
        del reader
        _say(progress, f"writing {WEIGHTS} ({dtype})")
        save_file(result.tensors, str(stage / WEIGHTS), metadata={"format": "pt"})
        del result.tensors
        result.config.save_pretrained(str(stage))
        _generation_config(result.config, tok, meta.arch).save_pretrained(str(stage))
        files = sorted(p.name for p in stage.iterdir())
        record = {
            "model": key,
            "architecture": result.config.architectures[0],
            "dtype": dtype,
            "source": {
                **(source or {}),
                "gguf": path.name,
                "sha256": file_sha256(path),
            },
            "tokenizer": tok_record,
            "files": [*files, PROVENANCE],
        }
        (stage / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
        _open_permissions(stage)
        if not out.exists():
            stage.rename(out)
            return out
        for name in files:  # the record goes last: a half-replaced folder keeps the old one
            os.replace(stage / name, out / name)
        for name in (previous or {}).get("files", []):
            if name not in record["files"] and _plain_name(name):
                (out / name).unlink(missing_ok=True)
        os.replace(stage / PROVENANCE, out / PROVENANCE)
        return out
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _plain_name(name: Any) -> bool:
    """A file name inside the folder (an earlier record's list is data, not trusted paths)."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def _open_permissions(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only entries; a model folder gets the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.iterdir():
        p.chmod(0o666 & ~umask)


def source_record(src: Source) -> dict[str, Any]:
    return {"package": src.spec.distribution, "version": src.version}


def convert(
    model: str | ModelSpec,
    out: Path | str,
    *,
    dtype: str = "bfloat16",
    progress: bool = True,
    gguf: Path | str | None = None,
    tokenizer: Path | str | None = None,
) -> Path:
    """Converts supported model ``model`` ("smollm2" or "gemma3") from its installed package, or
    from ``gguf``, a copy of its file (on a machine without the package), whose SHA-256 must be
    the pinned one. ``tokenizer``: see :func:`convert_gguf`."""
    spec = spec_for(model) if isinstance(model, str) else model
    if gguf is None:
        src = locate(spec)
        path, source = src.path, source_record(src)
    else:
        path = Path(gguf)
        if not path.is_file():
            raise ModelsError(f"--gguf {path}: no such file")
        _say(progress, f"checking the SHA-256 of {path}")
        digest = file_sha256(path)
        if digest != spec.sha256:
            raise ModelsError(
                f"--gguf {path} is not {spec.key}'s {spec.gguf_name} from {spec.requirement}: "
                f"its SHA-256 is {digest}, the pinned file's {spec.sha256}. Copy that file "
                f"(sparge-models list names its package)"
            )
        source = {"package": spec.distribution, "version": spec.version, "file": str(path),
                  "sha256": digest}
    return convert_gguf(path, out, key=spec.key, dtype=dtype, progress=progress, source=source,
                        tokenizer=tokenizer)
