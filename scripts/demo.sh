#!/usr/bin/env bash
# `make demo`: set up, build the data, run the shipped models on the test splits — with the time each part took.
set -euo pipefail
cd "$(dirname "$0")/.."
began=$SECONDS
lap() { echo "demo: $1 after $(( (SECONDS - began) / 60 )) min $(( (SECONDS - began) % 60 )) s"; }
echo "demo: a first run on a quiet 2-core CPU takes about 5 min: setup 1.5 (.venv 2.4 GB), data 1 (data/ 0.8 GB),"
echo "demo: then the two demos 1 + 2; on a busy machine 3-4 times that; a rerun skips setup and data"
make --no-print-directory setup
lap "setup done"
make --no-print-directory data
lap "data ready"
.venv/bin/metaembed demo
.venv/bin/metaembed demo --model models/metaembed-mini-multi --sources sheets --label metaembed-mini-multi \
    --json runs/demo/sheets.json --plot docs/demo-quality-sheets.png --index-dir runs/demo/index-sheets --compare
lap "all done"
