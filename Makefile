# The two README commands: `make demo` (set up, run the main job) and `make test` (set up, run the tests).
.PHONY: setup test test-all demo lint bench data

setup:
	@bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q

test-all: setup
	.venv/bin/python -m pytest -q -m ''

# The default model on the single-aspect tasks, then metaembed-mini-multi on the pages, where the budget pays.
demo: setup data
	.venv/bin/metaembed demo
	.venv/bin/metaembed demo --model models/metaembed-mini-multi --sources sheets --label metaembed-mini-multi \
		--json runs/demo/sheets.json --plot docs/demo-quality-sheets.png --index-dir runs/demo/index-sheets --compare

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
