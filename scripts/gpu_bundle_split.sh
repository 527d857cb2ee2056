#!/usr/bin/env bash
# Re-cut a vLLM 0.26.0 wheel bundle for an offline GPU machine (.gpu/p1..p3, each part with an
# install.sh in p3) into chunks small enough to travel with this working tree (its tracked and
# untracked, not ignored files: about 31 MB) in transfers of 64 MiB: each chunk is 64 MiB less
# the tree and 2 MiB of margin.
#
#   MAKE_BUNDLE=path/to/make_bundle.sh bash scripts/gpu_bundle_split.sh
#       # makes .gpu/p1..p3 with MAKE_BUNDLE unless they exist; writes .gpu/split/cpart00,
#       # cpart01, ... (four or five)
#
# Then, back to back on the GPU machine (an idle machine is given back after 30 s):
#   run carry [".gpu/split/cpart00"]: mkdir -p /tmp/stage && cp .gpu/split/cpart00/part00 /tmp/stage/
#   run carry [".gpu/split/cpart01"]: cp .gpu/split/cpart01/part01 /tmp/stage/   (and so on)
#   run carry [".gpu/split/<last>"]: cp .gpu/split/<last>/part* /tmp/stage/ &&
#       (cd /tmp/stage && cat part* | tar -x) && bash /tmp/stage/p3/install.sh /tmp/stage &&
#       export PYTHONPATH=/tmp/site && python3 -m pip install --no-deps --no-build-isolation
#       --no-index -e . && <your work>
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .gpu/p1 ]; then
  : "${MAKE_BUNDLE:?no bundle in .gpu/p1..p3: set MAKE_BUNDLE to the script that makes it}"
  bash "$MAKE_BUNDLE" .gpu
fi
tree=$(git ls-files -z --cached --others --exclude-standard \
         | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
chunk=$(( 64 - 2 - (tree + 1048575) / 1048576 ))
if [ "$chunk" -lt 8 ]; then
  echo "the working tree takes $((tree >> 20)) MiB of a 64 MiB transfer: move large files out" >&2
  exit 1
fi
rm -rf .gpu/split && mkdir -p .gpu/split
tar -cf - -C .gpu p1 p2 p3 | split -b "${chunk}m" -d - .gpu/split/part
for f in .gpu/split/part*; do d=.gpu/split/c$(basename "$f"); mkdir -p "$d"; mv "$f" "$d/"; done
du -sh .gpu/split/*
