#!/usr/bin/env bash
# Evaluates one model on the multi-aspect tasks in both protocols (MMEB: own 101 candidates, P@1; BEIR: full
# corpus, nDCG@5), on the dev split (for choosing between models), on the single-aspect OpenClipArt / emoji
# tasks, and measures its vector spread. Writes docs/results/multi-<label>/, which
# `python benchmarks/multi_aspect_results.py` turns into the tables of docs/results.md.
#   bash scripts/eval_multi_aspect.sh MODEL LABEL          (after `make data`; THREADS=n, default 1;
#                                                         SINGLE_ASPECT=0 skips OpenClipArt / emoji,
#                                                         DEV=0 the dev split)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 MODEL LABEL" >&2; exit 2; }
model=$1 label=$2 out=docs/results/multi-$2
export OMP_NUM_THREADS=${THREADS:-1}
run() { echo "eval_multi_aspect: $*" >&2; "$@"; }
single_aspect=(data/openclipart data/emoji)
[ "${SINGLE_ASPECT:-1}" = 1 ] || single_aspect=()
run .venv/bin/metaembed eval mmeb --model "$model" --label "$label" --batch-size 32 --out "$out" \
    --data data/sheets data/stdlib "${single_aspect[@]}"
run .venv/bin/metaembed eval vidore --model "$model" --label "$label" --batch-size 32 --out "$out" \
    --data data/sheets/beir data/stdlib/beir
if [ "${DEV:-1}" = 1 ]; then
    run .venv/bin/metaembed eval mmeb --model "$model" --label "$label" --batch-size 32 --out "$out/dev" \
        --data data/sheets/dev data/stdlib/dev --image-root data/sheets
fi
if [ "$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]+'/config.json'))['pooling'])" "$model")" = meta ]; then
    run .venv/bin/python benchmarks/meta_vector_spread.py --model "$model" --data data/sheets/eval/sheets_t2i_2x2.jsonl \
        --json "$out/spread.json"
fi
echo "eval_multi_aspect: done → $out" >&2
