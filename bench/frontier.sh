#!/usr/bin/env bash
# The quality-per-compute frontier (issue 23): adapt `topk-moe` at every policy and budget it is
# served with (same data, steps, LR and seed for each), evaluate each adapted model at its own
# routing and the unadapted base at the same routing (training-free), on held-out text none of
# them trained on; merge everything into one table and one plot (bench/frontier.py).
#
#   bash bench/frontier.sh                               # CPU defaults (see docs/frontier.md)
#   POINTS="topk1 topk2 seqtopk1.5" bash bench/frontier.sh    # a subset
#   STEPS=1200 BATCH_TOKENS=32768 DEVICE=cuda PARALLEL=1 OUT=runs/frontier bash bench/frontier.sh
#
# Resumable: an adapted checkpoint whose adapt.json exists and an eval folder whose results.json
# exists are kept, so a rerun only does what is missing (delete a folder to redo it).
# Training corpus: Python source of this environment's site-packages; held-out: the CPython
# standard library's top-level .py files (as bench/reproduce_adapt.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS=${MODELS:-../shared/models}
BASE=${BASE:-$MODELS/topk-moe}
OUT=${OUT:-bench/results/frontier}
CORPUS=${CORPUS:-$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')}
STDLIB=${STDLIB:-$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')}
STEPS=${STEPS:-60}
SEQ_LEN=${SEQ_LEN:-512}
BATCH_TOKENS=${BATCH_TOKENS:-4096}
LR=${LR:-3e-5}
SEED=${SEED:-0}
DEVICE=${DEVICE:-cpu}
WINDOWS=${WINDOWS:-48}
WINDOW=${WINDOW:-512}
# points run at once (each adapt with one CPU thread on the CPU); topany goes last so the
# others start before it
PARALLEL=${PARALLEL:-2}
POINTS=${POINTS:-topk2 seqtopk1.5 topk1 seqtopk2 seqtopk1 topp entropy topany}
# Top-p's p and the entropy policy's budget (k_max = 2*budget) put the base near 2 experts/token
# (measured on site-packages text: topp p=0.35 1.86, 0.40 2.16; entropy budget 1 1.93, 2 3.02)
TOPP_P=${TOPP_P:-0.37}
ENTROPY_BUDGET=${ENTROPY_BUDGET:-1}
# Top-Any starts at the model's K (4) and is pulled to the target by a penalty on the thresholds;
# at the default pace (10 x lr, coef 1) a 60-step run never gets there (docs/frontier.md)
TOPANY_FLAGS=${TOPANY_FLAGS:---routing-cap 8 --topany-target 2 --topany-coef 10 --topany-lr-scale 100}
PY=.venv/bin/python
SR=.venv/bin/vllm-seqroute
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}

if [ ! -d "$BASE" ]; then
  echo "reference checkpoint not found: $BASE (set MODELS or BASE)" >&2
  exit 2
fi
mkdir -p "$OUT/adapted" "$OUT/eval" "$OUT/logs"

flags_of() {  # adapt's routing flags for a point
  case "$1" in
    topk1) echo "--routing topk --routing-budget 1" ;;
    topk2) echo "--routing topk --routing-budget 2" ;;
    seqtopk1) echo "--routing seqtopk --routing-budget 1" ;;
    seqtopk1.5) echo "--routing seqtopk --routing-budget 1.5" ;;
    seqtopk2) echo "--routing seqtopk --routing-budget 2" ;;
    topp) echo "--routing topp --routing-p $TOPP_P" ;;
    entropy) echo "--routing entropy --routing-budget $ENTROPY_BUDGET" ;;
    topany) echo "--routing topany $TOPANY_FLAGS" ;;
    *) echo "unknown point: $1 (known: topk1 topk2 seqtopk1 seqtopk1.5 seqtopk2 topp entropy topany)" >&2
       return 2 ;;
  esac
}
for p in $POINTS; do flags_of "$p" > /dev/null; done

say() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

evaluate() {  # $1: model folder, $2: eval spec, $3: output folder
  if [ -f "$3/results.json" ]; then say "keep   eval $(basename "$3")"; return 0; fi
  say "start  eval $(basename "$3") ($2)"
  "$SR" eval --model "$1" --texts "$STDLIB"/*.py --routing "$2" --window "$WINDOW" \
    --max-windows "$WINDOWS" --no-records --gen-tokens 0 --no-progress --out "$3.tmp" \
    > "$OUT/logs/eval-$(basename "$3").log" 2>&1
  rm -rf "$3" && mv "$3.tmp" "$3"
  say "done   eval $(basename "$3"): $($PY bench/frontier.py row "$3")"
}

point() {  # adapt (unless kept), then eval adapted at its own routing, then the base at the same
  local p=$1 ck="$OUT/adapted/$1" threads=()
  if [ "$DEVICE" = cpu ] && [ "$PARALLEL" != 1 ]; then threads=(--threads 1); fi
  if [ -f "$ck/adapt.json" ]; then
    say "keep   adapt $p"
  else
    say "start  adapt $p ($(flags_of "$p"))"
    rm -rf "$ck"
    # shellcheck disable=SC2046
    "$SR" adapt --model "$BASE" --corpus "$CORPUS" --suffixes .py $(flags_of "$p") \
      --steps "$STEPS" --seq-len "$SEQ_LEN" --batch-tokens "$BATCH_TOKENS" --lr "$LR" --seed "$SEED" \
      --device "$DEVICE" --save-steps 0 --no-progress "${threads[@]}" --out "$ck" \
      > "$OUT/logs/adapt-$p.log" 2>&1 || { say "FAILED adapt $p: $(tail -1 "$OUT/logs/adapt-$p.log")"; return 1; }
    say "done   adapt $p: $($PY bench/frontier.py trained "$ck")"
  fi
  # the adapted checkpoint's recorded routing, as an eval spec: exactly what it serves with
  local spec
  spec=$($PY bench/frontier.py spec "$ck")
  evaluate "$ck" "$spec" "$OUT/eval/adapted-$p" || { say "FAILED eval adapted-$p"; return 1; }
  if [ "$p" != topany ]; then  # the base has no learned thresholds
    evaluate "$BASE" "$spec" "$OUT/eval/base-$p" || { say "FAILED eval base-$p"; return 1; }
  fi
}

ticker() {  # every 2 minutes: the last step of each adapt in progress
  while sleep 120; do
    for p in $POINTS; do
      local log="$OUT/adapted/$p/train_log.jsonl"
      if [ -f "$log" ] && [ ! -f "$OUT/adapted/$p/adapt.json" ]; then
        say "       adapt $p: $($PY bench/frontier.py step "$log")/$STEPS"
      fi
    done
  done
}

say "frontier: $BASE, $STEPS steps x $BATCH_TOKENS tokens, lr $LR, seed $SEED, $WINDOWS windows x $WINDOW," \
    "$PARALLEL at once, points: $POINTS -> $OUT"
t0=$(date +%s)
ticker &
tick=$!
trap 'kill "$tick" 2>/dev/null || true' EXIT
pids=()
for p in $POINTS; do
  while [ "$(jobs -rp | wc -l)" -gt "$PARALLEL" ]; do wait -n || true; done  # +1: the ticker
  point "$p" &
  pids+=("$!")
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
say "all points finished in $(( ($(date +%s) - t0) / 60 )) min ($failed failed)"
$PY bench/frontier.py table "$OUT" --out "$OUT/frontier"
