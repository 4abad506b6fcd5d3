"""``metaembed search``: text or image in, ranked results out, with the cost of the search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from metaembed import Budget, MetaEmbedModel, maxsim
from metaembed.cli import main
from metaembed.index import open_index
from metaembed.index.ingestion import ingest
from metaembed.model.card import read_quality
from metaembed.search import search

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("search")
    items = root / "items"
    items.mkdir()
    for colour in ("red", "green", "blue"):
        Image.new("RGB", (32, 32), colour).save(items / f"{colour}.png")
        (items / f"{colour}.txt").write_text(f"a {colour} square")
    (items / "report.md").write_text("quarterly revenue table for the board")
    model = MetaEmbedModel.from_pretrained(tiny_checkpoint).eval()
    ingest(root / "ix", model, items, dtype="fp32", progress=False)
    return root / "ix", items, model


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_search_ranks_like_maxsim_and_reports_its_cost(built):
    index_path, _, model = built
    with open_index(index_path, read_only=True) as index:
        found = search(index, model, "a red square", "2x4", k=4, quality={"2x4": {"P@1": 0.5}})
        stored, _ = index.get(index.ids())
        ids = index.ids()
    expected = maxsim(model.encode_queries(["a red square"]), stored, Budget(2, 4))[0]
    assert [h.id for h in found.results] == [ids[i] for i in expected.argsort(descending=True).tolist()]
    assert [h.rank for h in found.results] == [1, 2, 3, 4]
    assert found.index_bytes_read == 4 * 4 * model.embedding_dim * 4  # N · r_c · D · fp32
    assert found.encode_ms > 0 and found.score_ms > 0 and found.quality == {"P@1": 0.5}


def test_cli_table_json_image_and_errors(built, tiny_checkpoint, capsys):
    index_path, items, _ = built
    model = ("--model", tiny_checkpoint)
    code, out, _ = run(capsys, "search", index_path, "a red square", *model, "--budget", "4x8", "-k", "2")
    assert code == 0
    assert out.startswith("'a red square' at budget 4x8: top 2 of 4 items")
    assert "encode" in out and "scoring" in out and "read 8,192 B" in out
    rows = [line.split() for line in out.splitlines()[out.splitlines().index("") + 2 :]]
    assert [row[0] for row in rows] == ["1", "2"]
    code, same, _ = run(capsys, "search", index_path, "a red square", *model, "--budget", "4x8", "-k", "2", "--json")
    results = json.loads(same)["results"]
    assert [row[2] for row in rows] == [hit["id"] for hit in results]  # the table shows what the search found
    assert [" ".join(row[3:]) for row in rows] == [hit["metadata"]["caption"] for hit in results]
    code, out, _ = run(capsys, "search", index_path, "--image", items / "blue.png", *model, "-k", "1", "--json")
    body = json.loads(out)
    assert code == 0 and body["query"] == "blue.png" and body["budget"] == "16x64"
    assert body["results"][0]["metadata"]["kind"] == "image+text" and body["index_bytes_read"] > 0
    code, out, _ = run(capsys, "search", index_path, "red", *model, "--budget", "2", "--json")
    assert json.loads(out)["budget"] == "2x2"  # one number is NxN, as everywhere
    for argv, message in [
        ((index_path, "red", *model, "--budget", "32x64"), "budget 32x64 needs 32 query"),
        ((index_path, "  ", *model), "query text is empty"),
        ((index_path, *model), "give a query"),
        ((index_path, "--image", items / "nope.png", *model), "does not exist"),
        ((index_path.parent / "missing", "red", *model), "create it with `metaembed index build"),
    ]:
        code, _, err = run(capsys, "search", *argv)
        assert code == 2 and message in err, err


def test_model_card_quality_is_read_back(tiny_backbone, tmp_path):
    shipped = read_quality(ROOT / "models" / "metaembed-mini")
    assert shipped["4x8"]["test-split P@1"] == pytest.approx(0.1119)
    model = MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"))
    saved = model.save_pretrained(tmp_path / "ckpt", quality={"1x1": {"P@1": 0.25}, "16x64": {"P@1": 0.5}})
    assert read_quality(saved) == {"1x1": {"P@1": 0.25}, "16x64": {"P@1": 0.5}}
    assert read_quality(tmp_path) == {}
