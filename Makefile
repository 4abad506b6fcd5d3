# The two README commands: `make demo` (set up, run the main job) and `make test` (set up, run the tests).
.PHONY: setup test test-all demo lint bench data

setup:
	@bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q

test-all: setup
	.venv/bin/python -m pytest -q -m ''

# Setup, data, then the default model on the single-aspect tasks and metaembed-mini-multi on the pages, where
# the budget pays; scripts/demo.sh says up front how long each part takes and prints the time as it goes.
demo:
	@bash scripts/demo.sh

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench: setup
	.venv/bin/python benchmarks/maxsim_roofline.py

# Real offline datasets: fetch the raw packages (apt / npm, pinned and checksummed) into data/raw, then build
# data/openclipart and data/emoji, the multi-aspect data/sheets (pages of their pictures) and data/stdlib
# (sections of the standard library's docstrings); deterministic, see docs/data.md. A built dataset is not rebuilt.
data: setup data/openclipart/manifest.json data/emoji/manifest.json data/sheets/manifest.json data/stdlib/manifest.json

data/sheets/manifest.json: data/openclipart/manifest.json data/emoji/manifest.json
	.venv/bin/metaembed data build sheets

data/stdlib/manifest.json:
	.venv/bin/metaembed data build stdlib

data/%/manifest.json:
	bash scripts/fetch_resources.sh
	.venv/bin/metaembed data build $*
