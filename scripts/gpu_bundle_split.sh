#!/usr/bin/env bash
# Re-cut the vLLM GPU bundle (../shared/gpu/make_bundle.sh -> .gpu/p1..p3) into chunks that fit the
# device tool's 64 MiB per call *next to this working tree* (the committed model is ~24 MB).
#
#   bash scripts/gpu_bundle_split.sh            # writes .gpu/split/cpart00 .. cpart03 (<= 33 MiB)
#
# Then, back to back on the GPU machine (an idle machine is given back after 30 s):
#   run carry [".gpu/split/cpart00"]: mkdir -p /tmp/stage && cp .gpu/split/cpart00/part00 /tmp/stage/
#   run carry [".gpu/split/cpart01"]: cp .gpu/split/cpart01/part01 /tmp/stage/     (same for 02)
#   run carry [".gpu/split/cpart03"]: cp .gpu/split/cpart03/part03 /tmp/stage/ &&
#       (cd /tmp/stage && cat part0* | tar -x) && bash /tmp/stage/p3/install.sh /tmp/stage &&
#       export PYTHONPATH=/tmp/site && python3 -m pip install --no-deps --no-build-isolation
#       --no-index -e . && <your work>
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .gpu/p1 ] || bash ../shared/gpu/make_bundle.sh .gpu
rm -rf .gpu/split && mkdir -p .gpu/split
tar -cf - -C .gpu p1 p2 p3 | split -b 33m -d - .gpu/split/part
for f in .gpu/split/part*; do d=.gpu/split/c$(basename "$f"); mkdir -p "$d"; mv "$f" "$d/"; done
du -sh .gpu/split/*
