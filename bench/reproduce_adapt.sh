#!/usr/bin/env bash
# Reproduction (issue 6): adapt the reference `topk-moe` checkpoint to SeqTopK at budget 2 with
# `vllm-seqroute adapt`, train an equal-steps TopK@2 control, then evaluate both (and the
# unadapted base) through vLLM on the CPython standard library with `vllm-seqroute eval`.
#
#   bash bench/reproduce_adapt.sh            # CPU-sized defaults (about an hour on 2 cores)
#   STEPS=1200 BATCH_TOKENS=32768 DEVICE=cuda bash bench/reproduce_adapt.sh   # the reference run
#   NPROC=8 STEPS=1200 BATCH_TOKENS=32768 DEVICE=cuda bash bench/reproduce_adapt.sh   # 8 GPUs (DDP)
#
# The training corpus is Python source from this environment's site-packages (not the standard
# library, which is the held-out set). Results: $OUT/eval/results.md and the PNG plots beside it.
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS=${MODELS:-../shared/models}
BASE=${BASE:-$MODELS/topk-moe}
OUT=${OUT:-bench/results/adapt}
CORPUS=${CORPUS:-$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')}
STDLIB=${STDLIB:-$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')}
STEPS=${STEPS:-150}
SEQ_LEN=${SEQ_LEN:-512}
BATCH_TOKENS=${BATCH_TOKENS:-4096}
LR=${LR:-3e-4}
DEVICE=${DEVICE:-cpu}
# processes per fine-tune (torchrun, DDP; the global batch stays BATCH_TOKENS)
NPROC=${NPROC:-1}
# both fine-tunes run side by side, one CPU thread each (set PARALLEL=0 to run them in turn)
PARALLEL=${PARALLEL:-1}
if [ "$NPROC" != 1 ]; then PARALLEL=0; fi
WINDOWS=${WINDOWS:-32}

if [ ! -d "$BASE" ]; then
  echo "reference checkpoint not found: $BASE (set MODELS or BASE)" >&2
  exit 2
fi
mkdir -p "$OUT"
SR=.venv/bin/vllm-seqroute

adapt() {  # $1: policy, $2: output name, $3: extra flags
  local threads=() launch=("$SR" adapt)
  if [ "$PARALLEL" = 1 ] && [ "$DEVICE" = cpu ]; then threads=(--threads 1); fi
  if [ "$NPROC" != 1 ]; then
    launch=(.venv/bin/torchrun --standalone --nproc-per-node "$NPROC" -m vllm_seqroute.adapt.cli)
  fi
  # shellcheck disable=SC2086
  "${launch[@]}" --model "$BASE" --corpus "$CORPUS" --suffixes .py --routing "$1" --routing-budget 2 $3 \
    --steps "$STEPS" --seq-len "$SEQ_LEN" --batch-tokens "$BATCH_TOKENS" --lr "$LR" \
    --device "$DEVICE" --save-steps 0 "${threads[@]}" --out "$OUT/$2"
}

if [ "$PARALLEL" = 1 ]; then
  adapt seqtopk seqtopk-adapted "--routing-cap 4" > "$OUT/seqtopk-adapted.log" 2>&1 &
  p1=$!
  adapt topk topk-control "" > "$OUT/topk-control.log" 2>&1 &
  p2=$!
  # progress: the last line each fine-tune printed
  while kill -0 "$p1" 2>/dev/null || kill -0 "$p2" 2>/dev/null; do
    sleep 30
    for n in seqtopk-adapted topk-control; do
      printf '%s: %s\n' "$n" "$(tr '\r' '\n' < "$OUT/$n.log" | grep -a 'loss=' | tail -1)"
    done
  done
  wait "$p1"
  wait "$p2"
else
  adapt seqtopk seqtopk-adapted "--routing-cap 4"
  adapt topk topk-control ""
fi

"$SR" eval --model "$OUT/seqtopk-adapted" "$OUT/topk-control" "$BASE" \
  --texts "$STDLIB"/*.py --routing topk:2 seqtopk:2,cap=4 \
  --window 512 --max-windows "$WINDOWS" --out "$OUT/eval"
