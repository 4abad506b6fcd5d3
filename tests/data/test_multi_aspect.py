"""The multi-aspect builders (sheets, stdlib): bookkeeping, splits, masking, determinism, both runners."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaembed.cli import main
from metaembed.data import BuildOptions, DataError, ImageSkippedWarning, MissingRawDataError, build_dataset
from metaembed.data.sheets import GUTTER, SheetOptions, build_sheets
from metaembed.data.stdlib_docs import MEMBERS_PER_SECTION, MIN_MEMBERS_PER_SECTION, build_stdlib, mask, sections
from metaembed.eval.mmeb import evaluate_mmeb, load_datasets
from metaembed.eval.vidore import evaluate_vidore, resolve_tasks

SHEETS = SheetOptions(page_size=96, grids=(2, 3), query_size=48, num_distractors=5)
# sha256 of the manifests' "files" maps, recorded once: a rebuild on another day must give the same bytes
# (PNG bytes depend on the Pillow version, recorded in the source builds' manifests).
SHEETS_DIGEST = "fcc6335e8de8e93bb65604db134d41f36674c4df079e7c6d34974f2469c0ca64"
STDLIB_DIGEST = "9430cbb99f37a111aa3a1f30413c025523c272be44fc286ecf22457694e4dc72"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def files_digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


@pytest.fixture
def sources(rawkit, tmp_path):
    """Built openclipart + emoji datasets (synthetic raw trees, 150 items each) to compose pages from."""
    raw = rawkit.make_openclipart_raw(tmp_path / "raw", n=150)
    rawkit.make_emoji_raw(raw, n=150)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageSkippedWarning)
        for source in ("openclipart", "emoji"):
            build_dataset(source, raw, tmp_path / "data", BuildOptions(size=32, num_distractors=5))
    return tmp_path / "data"


@pytest.fixture
def sheets(sources):
    return sources / "sheets", build_sheets(sources, sources, SHEETS)


def source_splits(data: Path) -> dict[str, str]:
    """uid → the split its source dataset gave it."""
    return {
        f"{source}__{row['id']}": row["split"]
        for source in ("openclipart", "emoji")
        for row in read_jsonl(data / source / "items.jsonl")
    }


# ------------------------------------------------------------------------------------------------ sheets
def test_sheets_pages_hold_their_query_tile_and_tiles_of_one_split(sheets):
    folder, manifest = sheets
    splits = source_splits(folder.parent)
    page_parts = {}
    for task in ("sheets_t2i_2x2", "sheets_i2i_3x3"):
        corpus = read_jsonl(folder / "beir" / task / "corpus.jsonl")
        queries = read_jsonl(folder / "beir" / task / "queries.jsonl")
        qrels = read_jsonl(folder / "beir" / task / "qrels.jsonl")
        parts = {row["corpus-id"]: row["parts"] for row in corpus}
        grid = int(task[-1])
        assert all(len(p) == grid * grid for p in parts.values())
        tiles = [uid for p in parts.values() for uid in p]
        assert len(tiles) == len(set(tiles)), "a tile appears on two pages of one task"
        assert {splits[uid] for uid in tiles} == {"test"}, "a test page holds a training tile"
        assert [q["query-id"] for q in queries] == [r["query-id"] for r in qrels]
        for row in qrels:  # the gold page holds exactly the queried tile
            assert row["query-id"] in parts[row["corpus-id"]]
        assert len(queries) == len(tiles)  # every placed tile is queried once
        page_parts.update(parts)
        # MMEB file: same queries in the same order, gold first, distinct candidates from the test pages
        records = read_jsonl(folder / "eval" / f"{task}.jsonl")
        assert len(records) == len(queries)
        for record, row in zip(records, qrels, strict=True):
            paths = record["tgt_img_path"]
            assert paths[0] == f"images/pages/{row['corpus-id']}.png"
            assert len(set(paths)) == len(paths) == 1 + manifest["eval"]["distractors_per_query"][f"test/{task}"]
    # dev pages hold dev tiles only: training tiles carved out by the dev rule, never test ones
    dev = read_jsonl(folder / "dev" / "sheets_t2i_2x2.jsonl")
    train = read_jsonl(folder / "train" / "sheets_t2i_2x2.jsonl")
    dev_pages = {p for record in dev for p in record["tgt_img_path"]}
    train_pages = {r["pos_image_path"] for r in train} | {r["neg_image_path"] for r in train}
    assert all("-dev-" in p for p in dev_pages) and all("-train-" in p for p in train_pages)
    test_tiles = sum(1 for split in splits.values() if split == "test")
    for grid in (2, 3):  # placed + left over = every test tile, per grid
        key = f"{grid}x{grid}/test"
        assert manifest["counts"][key]["tiles"] + len(manifest["left_over_tiles"][key]) == test_tiles


def test_sheets_page_cells_are_the_tiles_in_row_major_order(sheets):
    folder, _ = sheets
    corpus = read_jsonl(folder / "beir" / "sheets_i2i_3x3" / "corpus.jsonl")
    row = corpus[0]
    page = np.asarray(Image.open(folder / "beir" / "sheets_i2i_3x3" / row["image"]))
    cell = SHEETS.page_size // 3
    inner = cell - 2 * GUTTER
    for k, uid in enumerate(row["parts"]):
        source, item_id = uid.split("__", 1)
        with Image.open(folder.parent / source / "images" / f"{item_id}.png") as tile:
            expected = np.asarray(tile.convert("RGB").resize((inner, inner), Image.Resampling.LANCZOS))
        r, c = divmod(k, 3)
        top, left = r * cell + GUTTER, c * cell + GUTTER
        assert np.array_equal(page[top : top + inner, left : left + inner], expected), f"cell {k} is not {uid}"


def test_sheets_i2i_query_redraws_its_tile(sheets):
    folder, _ = sheets
    query = read_jsonl(folder / "beir" / "sheets_i2i_2x2" / "queries.jsonl")[0]
    image = np.asarray(Image.open(folder / "beir" / "sheets_i2i_2x2" / query["image"]))
    assert image.shape == (SHEETS.query_size, SHEETS.query_size, 3)
    ink = np.argwhere(image.min(-1) < 250)
    assert len(ink) and (ink.max(0) - ink.min(0)).max() < SHEETS.query_size  # drawn smaller, not full size


def test_sheets_rebuild_is_byte_identical_and_matches_the_stored_digest(sheets, tmp_path):
    folder, manifest = sheets
    again = build_sheets(folder.parent, tmp_path / "again", SHEETS)
    assert again["files"] == manifest["files"]
    assert files_digest(manifest) == SHEETS_DIGEST


def test_sheets_needs_the_built_sources_and_sane_options(tmp_path, sources):
    with pytest.raises(MissingRawDataError, match="metaembed data build openclipart"):
        build_sheets(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(DataError, match="grids"):
        build_sheets(sources, tmp_path / "out", SheetOptions(grids=(2, 2)))
    assert not (tmp_path / "out" / "sheets").exists()


# ------------------------------------------------------------------------------------------------ stdlib
MODULE = '''"""A fixture module."""


def join_paths(first, second):
    """Join two path components with the right separator for this NAME system.

    More text that is not part of the summary.
    """


def _private():
    """Hidden helper functions never become members of a section."""


def split_words(text):
    """Split a NAME sentence into its words, dropping punctuation marks."""


def shout(text):
    """Return the very same object to the caller."""


def count_lines(path):
    """Count the lines of a NAME text file without reading it whole."""


class Reader:
    """A buffered NAME reader that remembers how far it has read."""

    def read_chunk(self, size):
        """Read at most size bytes from the underlying NAME stream."""

    def rewind(self):
        """Go back to the first byte of the NAME stream once more."""

    def _fill(self):
        """Refill the buffer from the stream when it runs dry."""


def too_short():
    """Do it."""
'''


MODULE_NAMES = [f"mod{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(40)]


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    for name in MODULE_NAMES:
        text = MODULE.replace("NAME", f"x{name}")
        (root / f"{name}.py").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{name}.py").write_text(text.replace("Reader", f"{name.title()}Reader"))
    extra = '\n\ndef other():\n    """Return the very same object to the caller."""\n'
    (root / "modab.py").write_text((root / "modab.py").read_text() + extra)
    (root / "test").mkdir()
    (root / "test" / "test_alpha.py").write_text(MODULE)  # tests are not documentation
    (root / "_private_mod.py").write_text(MODULE)
    (root / "broken.py").write_text("def (:\n")
    return root


def test_mask_replaces_member_and_module_names_as_whole_words():
    assert mask("Join two parts; joiner joins JOIN.", "join", "os.path") == "this two parts; joiner joins this."
    assert mask("Read from the reader of os paths.", "Reader.read", "os.path") == "this from the this of this paths."


def test_sections_are_even_and_at_most_the_limit():
    for n in range(1, 30):
        cut = sections(list(range(n)))
        assert [x for s in cut for x in s] == list(range(n))
        assert max(map(len, cut)) <= MEMBERS_PER_SECTION and max(map(len, cut)) - min(map(len, cut)) <= 1


def test_stdlib_build_rules_masking_split_and_digest(fake_stdlib, tmp_path):
    manifest = build_stdlib(tmp_path / "out", fake_stdlib, test_percent=30, num_distractors=5)
    folder = tmp_path / "out" / "stdlib"
    assert manifest["unreadable_files"][0]["file"] == "broken.py"  # counted and named, not silently dropped
    assert manifest["counts"]["dropped"]["repeated_summary"] == len(MODULE_NAMES) + 1  # the same summary ×41
    corpus = read_jsonl(folder / "beir" / "stdlib_sections" / "corpus.jsonl")
    queries = read_jsonl(folder / "beir" / "stdlib_sections" / "queries.jsonl")
    qrels = {r["query-id"]: r["corpus-id"] for r in read_jsonl(folder / "beir" / "stdlib_sections" / "qrels.jsonl")}
    parts = {row["corpus-id"]: row["parts"] for row in corpus}
    assert all(MIN_MEMBERS_PER_SECTION <= len(p) <= MEMBERS_PER_SECTION for p in parts.values())
    names = {m.split(": ")[0] for p in parts.values() for m in p}
    assert not any(n.startswith("_") or n.split(".")[-1].startswith("_") for n in names)
    assert "too_short" not in names and "shout" not in names
    for query in queries:
        module, member = query["query-id"].split(":")
        section = qrels[query["query-id"]]
        assert section.split("#")[0] == module
        assert any(p.startswith(member + ": ") for p in parts[section])  # the gold section holds the member
        for word in {*member.split("."), module}:
            assert word.lower() not in query["query"].lower().split()
    test_modules = {cid.split("#")[0] for cid in parts}
    train = read_jsonl(folder / "train" / "stdlib_sections.jsonl")
    assert not any(any(f"Module {m}." in r["pos_text"] for m in test_modules) for r in train)
    assert "test_alpha" not in json.dumps(manifest["stdlib"]) and "_private_mod" not in json.dumps(manifest["stdlib"])
    again = build_stdlib(tmp_path / "again", fake_stdlib, test_percent=30, num_distractors=5)
    assert again["files"] == manifest["files"]
    assert files_digest(manifest) == STDLIB_DIGEST


def test_cli_builds_stdlib(fake_stdlib, tmp_path, capsys):
    assert main(["data", "build", "stdlib", "--stdlib", str(fake_stdlib), "--out", str(tmp_path), "--test-percent",
                 "30", "--distractors", "5"]) == 0  # fmt: skip
    assert "test sections" in capsys.readouterr().out
    assert main(["data", "verify", str(tmp_path / "stdlib")]) == 0


# -------------------------------------------------------------------------------------- both runners
class PartsEncoder:
    """Oracle encoder: a query is the one-hot of its tile/member; a candidate's vectors are its parts' one-hots
    after a vector 0 that is the same for every candidate. So the full budget finds every gold page and 1x1
    finds none (ties count against the gold)."""

    def __init__(self, query_part: dict, candidate_parts: dict, vocabulary: list[str]):
        self.query_part, self.candidate_parts = query_part, candidate_parts
        self.index = {part: i for i, part in enumerate(vocabulary)}

    def num_vectors(self, side):
        return 16 if side == "query" else 64

    @staticmethod
    def key(item):
        image = item.get("image")
        return Path(image).name if image is not None else item.get("text")

    def one_hot(self, part):
        vector = torch.zeros(len(self.index))
        vector[self.index[part]] = 1
        return vector

    def encode_queries(self, items, *, batch_size=8):
        return torch.stack([self.one_hot(self.query_part[self.key(i)]).expand(16, -1) for i in items])

    def encode_candidates(self, items, *, batch_size=8):
        out = torch.zeros(len(items), 64, len(self.index))
        for n, item in enumerate(items):
            parts = [self.one_hot(p) for p in self.candidate_parts[self.key(item)]]
            out[n, 0] = 1 / len(self.index)
            out[n, 1 : 1 + len(parts)] = torch.stack(parts)
        return out


def oracle(folder: Path, task: str) -> PartsEncoder:
    beir = folder / "beir" / task
    corpus, queries = read_jsonl(beir / "corpus.jsonl"), read_jsonl(beir / "queries.jsonl")
    key = PartsEncoder.key
    candidate_parts = {key({"image": r.get("image"), "text": r.get("text")}): r["parts"] for r in corpus}
    gold = {r["query-id"]: r["corpus-id"] for r in read_jsonl(beir / "qrels.jsonl")}
    parts_of = {r["corpus-id"]: r["parts"] for r in corpus}
    query_part = {}
    for row in queries:
        part = row["query-id"]
        if task.startswith("stdlib"):  # the member's part in its gold section
            member = row["query-id"].split(":")[1]
            part = next(p for p in parts_of[gold[row["query-id"]]] if p.startswith(member + ": "))
        query_part[key({"image": row.get("image"), "text": row.get("query")})] = part
    vocabulary = sorted({p for parts in candidate_parts.values() for p in parts})
    return PartsEncoder(query_part, candidate_parts, vocabulary)


@pytest.mark.parametrize("task", ["sheets_i2i_2x2", "sheets_t2i_3x3", "stdlib_sections"])
def test_both_runners_read_the_tasks_back_and_score_the_oracle(task, sheets, fake_stdlib, tmp_path):
    folder = sheets[0] if task.startswith("sheets") else tmp_path / "out" / "stdlib"
    if not task.startswith("sheets"):
        build_stdlib(tmp_path / "out", fake_stdlib, test_percent=30, num_distractors=5)
    encoder = oracle(folder, task)
    budgets = ["1x1", "16x64"]
    mmeb = evaluate_mmeb(encoder, [d for d in load_datasets(folder) if d.name == task], budgets)
    vidore = evaluate_vidore(encoder, resolve_tasks(folder / "beir", [task]), budgets)
    for result, metric in ((mmeb, "precision_at_1"), (vidore, "ndcg_at_5")):
        values = {s["budget"]: s["value"] for s in result.scores if s["metric"] == metric}
        assert values["16x64"] == pytest.approx(1.0)  # every gold found once the parts take part
        assert values["1x1"] < 1.0  # one averaged vector confuses pages
