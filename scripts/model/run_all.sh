#!/usr/bin/env bash
# Build the tiny code model end to end: corpus -> tokenizer -> train -> eval -> pack.
#
#   bash scripts/model/run_all.sh OUT_DIR [WORK_DIR]
#
# WORK_DIR (default ${TMPDIR:-/tmp}/sparge-tiny-work) receives the corpus and the model folder
# WORK_DIR/sparge-tiny-code, usable in place (e.g. by vLLM in the same command).
# OUT_DIR receives 8 files, none over 15 MiB (the device tool returns at most 8 files of 16 MiB):
#   sparge-tiny-code.tar.part00, .part01   the model folder; rejoin with
#                                          cat OUT_DIR/sparge-tiny-code.tar.part* | tar -x -C models/
#   eval.json  train_log.json  data_manifest.json  attention_8k.png  model_card.md  run_all.log
#
# The whole pipeline keeps within TOTAL_MINUTES (default 9.3: one device command is capped at 10
# minutes); training gets what the data step leaves, minus EVAL_RESERVE_MINUTES.
# Environment knobs: PYTHON, TOTAL_MINUTES, TRAIN_MINUTES (overrides the computed budget),
# EVAL_RESERVE_MINUTES, MAX_CHARS, VOCAB, COMPILE (1/0), TRAIN_ARGS, EVAL_ARGS, STAGES
# (default "data train eval pack"), TINY=1 (a CPU smoke run of the whole pipeline in ~2 min).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,18p' "$0"
  exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
WORK="${2:-${TMPDIR:-/tmp}/sparge-tiny-work}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
NAME=sparge-tiny-code
MODEL="$WORK/$NAME"
DATA="$WORK/data"

PY="${PYTHON:-python3}"
TOTAL_MINUTES="${TOTAL_MINUTES:-9.3}"
EVAL_RESERVE_MINUTES="${EVAL_RESERVE_MINUTES:-1.3}"
MAX_CHARS="${MAX_CHARS:-300e6}"
VOCAB="${VOCAB:-4096}"
COMPILE="${COMPILE:-0}"  # attention dominates at 16K: compiling costs more than it saves
STAGES="${STAGES:-data train eval pack}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
EVAL_ARGS="${EVAL_ARGS:-}"
if [[ "${TINY:-0}" == 1 ]]; then
  MAX_CHARS=3e6
  VOCAB=1024
  COMPILE=0
  TRAIN_ARGS="--layers 2 --hidden 64 --intermediate 128 --heads 2 --kv-heads 1 --head-dim 32
    --ctx 512 --warm-ctx 256 --batch-tokens 4096 --micro-batch-tokens 4096 --max-steps 20
    --warmup-steps 4 --lr 3e-3 --log-every 5 --eval-every 10 --eval-windows 2 $TRAIN_ARGS"
  EVAL_ARGS="--ctx 128 256 512 --attn-ctx 256 512 --plot-ctx 512 --map-size 64
    --rows-per-chunk 256 --span-windows 4 $EVAL_ARGS"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true

stamp() { echo "=== [$(date -u +%H:%M:%S) +${SECONDS}s] $*"; }
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

run_stages() {
  stamp "run_all: OUT=$OUT WORK=$WORK STAGES='$STAGES' TOTAL_MINUTES=$TOTAL_MINUTES"
  "$PY" - <<'EOF' || true
import os, platform, sys
import torch, transformers, tokenizers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"python {sys.version.split()[0]} torch {torch.__version__} transformers "
      f"{transformers.__version__} tokenizers {tokenizers.__version__} gpu {gpu} "
      f"cpus {os.cpu_count()} {platform.platform()}")
EOF

  if has_stage data; then
    stamp "data: collect (max ${MAX_CHARS} chars)"
    rm -rf "$DATA" "$MODEL"
    "$PY" "$HERE/build_corpus.py" collect --out "$DATA" --max-chars "$MAX_CHARS"
    stamp "data: tokenizer (vocab $VOCAB)"
    "$PY" "$HERE/train_tokenizer.py" --corpus "$DATA" --out "$MODEL" --vocab-size "$VOCAB"
    stamp "data: encode"
    "$PY" "$HERE/build_corpus.py" encode --data "$DATA" --tokenizer "$MODEL"
  fi

  if has_stage train; then
    if [[ -n "${TRAIN_MINUTES:-}" ]]; then
      minutes="$TRAIN_MINUTES"
    else
      minutes="$(awk -v t="$TOTAL_MINUTES" -v r="$EVAL_RESERVE_MINUTES" -v s="$SECONDS" \
        'BEGIN { m = t - r - s / 60; if (m < 0.5) m = 0.5; printf "%.2f", m }')"
    fi
    compile_flag=""
    [[ "$COMPILE" == 1 ]] && compile_flag="--compile"
    stamp "train: ${minutes} minutes $compile_flag"
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of words
    "$PY" "$HERE/train_model.py" --data "$DATA" --out "$MODEL" --log-json "$OUT/train_log.json" \
      --minutes "$minutes" $compile_flag $TRAIN_ARGS
  fi

  if has_stage eval; then
    stamp "eval"
    # shellcheck disable=SC2086
    "$PY" "$HERE/eval_model.py" --model "$MODEL" --data "$DATA" --out-json "$OUT/eval.json" \
      --plot "$OUT/attention_8k.png" --card "$OUT/model_card.md" \
      --train-log "$OUT/train_log.json" $EVAL_ARGS
  fi

  if has_stage pack; then
    stamp "pack"
    cp "$DATA/manifest.json" "$OUT/data_manifest.json"
    rm -f "$OUT/$NAME.tar.part"*
    chmod a+r "$MODEL"/*  # safetensors are written 0600
    tar -C "$WORK" -cf - "$NAME" | split -b 15M -d -a 2 - "$OUT/$NAME.tar.part"
    ls -l "$MODEL" "$OUT"
    du -sb "$MODEL"
    (cd "$MODEL" && sha256sum model.safetensors)
  fi
  stamp "done"
}

# A pipeline rather than `exec > >(tee ...)`: the script returns only once the log is complete.
run_stages 2>&1 | tee -a "$OUT/run_all.log"
exit "${PIPESTATUS[0]}"
