"""Pack what an offline GPU machine needs beyond the vLLM bundle into chunks that travel with the tree.

    python3 scripts/gpu_payload.py --models smollm2 gemma3 --extra quality \
        --skip pandas pyarrow scipy scikit-learn lxml joblib
        # writes .gpu/payload/cpart00, cpart01, ... (each what a transfer leaves beside the tree)

Run it with a Python that has pip (not the project's uv environment, which has none; the
models are located in that environment through ``uv run``). The GPU machines have no network, Python 3.12, torch and transformers, and get vLLM 0.26.0 from
a wheel bundle (``scripts/gpu_bundle_split.sh``); a transfer carries the working tree (its
tracked and untracked, not ignored files: about 31 MB) and at most 64 MiB in all, so a chunk is
64 MiB less the tree and 2 MiB of margin (``--chunk-mb`` sets it). The payload holds:

- ``models/<model>.gguf``: the real models' GGUF files, from their installed packages
  (``sparge-models list``), with the ``gguf`` wheel that reads them, and
  ``models/<model>.tokenizer/``: each one's tokenizer as ``sparge-models convert`` writes it with
  this environment's transformers (checked against the file; the GPU machine's transformers may
  be older than the one that converts Gemma 3's tokenizer right);
- ``wheels/``: the wheels an optional extra of pyproject.toml adds to the locked environment
  (``uv export`` with and without it: exactly the packages the base install lacks), for CPython
  3.12 on manylinux x86_64; a package published only as source is built into a wheel here (pure
  Python ones; anything else is refused).

Then, back to back on the GPU machine (an idle one is given back after 30 s), one call per chunk:

    run carry [".gpu/payload/cpartNN"]: mkdir -p /tmp/pstage && cp .gpu/payload/cpartNN/* /tmp/pstage/

and, with the vLLM bundle installed, ``bash scripts/gpu_session.sh payload`` joins the chunks,
installs the wheels into /tmp/site (never over a package already there) and converts each model
into /tmp/models/<model> (``sparge-models convert MODEL --gguf FILE --tokenizer DIR``, its
SHA-256 checked).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            *[a for tag in ("manylinux_2_17_x86_64", "manylinux_2_28_x86_64",
                            "manylinux_2_34_x86_64", "manylinux2014_x86_64", "any")
              for a in ("--platform", tag)]]
"""pip download's target: the GPU machines' CPython 3.12 on x86_64 Linux."""
PIP = [sys.executable, "-m", "pip"]
"""The pip that downloads and builds wheels (``--pip``: a uv environment has none)."""


def _pins(extra: str | None) -> dict[str, str]:
    """``{name: version}`` of the locked environment (with ``extra``), from ``uv export``."""
    cmd = ["uv", "export", "--no-hashes", "--no-emit-project", "--format", "requirements-txt"]
    if extra:
        cmd += ["--extra", extra]
    text = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    pins = {}
    for line in text.splitlines():
        m = re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(3)
    return pins


def extra_wheels(extra: str, dest: Path, skip: set[str]) -> list[str]:
    """Download (or build) the wheels ``extra`` adds to the locked base environment, less the
    packages in ``skip`` (ones the GPU machine already has)."""
    base, full = _pins(None), _pins(extra)
    added = sorted((n, v) for n, v in full.items() if n not in base and n not in skip)
    if not added:
        sys.exit(f"gpu_payload: the extra {extra!r} adds no package (is it in pyproject.toml?)")
    for name, version in added:
        spec = f"{name}=={version}"
        got = subprocess.run([*PIP, "download", "-q", "--no-deps",
                              *PLATFORM, "-d", str(dest), spec], capture_output=True, text=True)
        if got.returncode == 0:
            continue
        # published as source only: a pure-Python wheel built here serves any platform
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([*PIP, "wheel", "-q", "--no-deps", "-w", tmp,
                            spec], check=True)
            for whl in Path(tmp).glob("*.whl"):
                if not whl.name.endswith("-none-any.whl"):
                    sys.exit(f"gpu_payload: {spec} has no wheel for the GPU machines and builds "
                             f"a platform wheel here ({whl.name})")
                shutil.move(str(whl), dest / whl.name)
    return [f"{n}=={v}" for n, v in added]


_LOCATE = """import sys
from pathlib import Path
from sparge_serve.models.gguf_source import ModelsError, locate, spec_for
from sparge_serve.models.tokenizer import write_tokenizer
try:
    path = locate(spec_for(sys.argv[1])).path
    write_tokenizer(path, Path(sys.argv[2]))
    print(path)
except ModelsError as e:
    sys.exit(f"gpu_payload: {e}")"""


def model_files(keys: list[str], models: Path, wheels: Path) -> None:
    """Link each model's GGUF file (located in the project's uv environment, where the model
    packages are installed) into ``models``, write its checked tokenizer (made by this
    environment's transformers) into ``models/<model>.tokenizer`` and fetch the locked ``gguf``
    wheel."""
    for key in keys:
        found = subprocess.run(["uv", "run", "--no-sync", "python", "-c", _LOCATE, key,
                                str(models / f"{key}.tokenizer")], cwd=ROOT,
                               capture_output=True, text=True)
        if found.returncode:
            sys.exit(found.stderr.strip().splitlines()[-1])
        (models / f"{key}.gguf").symlink_to(Path(found.stdout.strip()).resolve())
    gguf = _pins("models")["gguf"]
    subprocess.run([*PIP, "download", "-q", "--no-deps", *PLATFORM,
                    "-d", str(wheels), f"gguf=={gguf}"], check=True)


def chunk_mib() -> int:
    """MiB of a chunk that travels beside the working tree in one 64 MiB transfer: 64 less the
    tree (the files git tracks, and the untracked ones it does not ignore) and 2 of margin."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    tree = sum((ROOT / os.fsdecode(f)).stat().st_size for f in listed
               if f and (ROOT / os.fsdecode(f)).is_file())
    mib = 64 - 2 - -(-tree >> 20)
    if mib < 8:
        sys.exit(f"gpu_payload: the working tree takes {tree >> 20} MiB of a 64 MiB transfer; "
                 "give --chunk-mb or move large untracked files out of it")
    return mib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=[], metavar="MODEL",
                    help="real models to carry (smollm2, gemma3)")
    ap.add_argument("--extra", action="append", default=[],
                    help="an optional extra of pyproject.toml whose added wheels to carry")
    ap.add_argument("--chunk-mb", type=int, default=None,
                    help="MiB a chunk (default: 64 less the working tree's size and 2)")
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu" / "payload")
    ap.add_argument("--skip", nargs="+", default=[], metavar="PACKAGE",
                    help="packages of an extra not to carry: the GPU machine has them (e.g. "
                         "pandas pyarrow scipy scikit-learn)")
    ap.add_argument("--pip", default=None,
                    help="the pip command that downloads (default: this interpreter's)")
    args = ap.parse_args()
    args.out = args.out.resolve()
    global PIP
    if args.pip:
        PIP = shlex.split(args.pip)
    if not args.models and not args.extra:
        ap.error("nothing to pack: give --models and/or --extra")
    if subprocess.run([*PIP, "--version"], capture_output=True).returncode != 0:
        sys.exit(f"gpu_payload: '{shlex.join(PIP)}' is no pip: run this script with a Python "
                 "that has pip (python3 scripts/gpu_payload.py, not uv run) or name one with --pip")
    if args.out.exists():
        stray = [p.name for p in args.out.iterdir() if not re.fullmatch(r"cpart\d\d", p.name)]
        if stray:
            sys.exit(f"gpu_payload: {args.out} holds files this script did not write "
                     f"({', '.join(sorted(stray)[:3])}): give --out an empty or new folder")
        shutil.rmtree(args.out)
    skip = {n.lower().replace("_", "-") for n in args.skip}
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        (stage / "models").mkdir()
        (stage / "wheels").mkdir()
        if args.models:
            model_files(args.models, stage / "models", stage / "wheels")
        for extra in args.extra:
            print(f"{extra}: {' '.join(extra_wheels(extra, stage / 'wheels', skip))}")
        blob = stage / "payload.tar"
        with tarfile.open(blob, "w", dereference=True) as tar:
            tar.add(stage / "models", "models")
            tar.add(stage / "wheels", "wheels")
        size, step = blob.stat().st_size, (args.chunk_mb or chunk_mib()) << 20
        with open(blob, "rb") as f:
            for i in range(-(-size // step)):
                part = args.out / f"cpart{i:02d}"
                part.mkdir(parents=True)
                (part / f"part{i:02d}").write_bytes(f.read(step))
    for part in sorted(args.out.iterdir()):
        print(f"{part}: {sum(p.stat().st_size for p in part.iterdir()) >> 20} MiB")


if __name__ == "__main__":
    main()
