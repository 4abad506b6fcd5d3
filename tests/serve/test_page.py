"""The search page's routes: the page and its files, /v1/budgets, /v1/thumbnail (and nothing else on disk)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from metaembed.index.ingestion import ingest

QUALITY = {"1x1": {"P@1": 0.25}, "4x8": {"P@1": 0.5}}


@pytest.fixture
def gallery(tmp_path, serve_model):
    """A folder with two images (one captioned) and a text file, indexed; a secret image next to the folder."""
    items = tmp_path / "items"
    items.mkdir()
    Image.new("RGB", (300, 200), (200, 30, 30)).save(items / "red.png")
    (items / "red.txt").write_text("a red rectangle")
    Image.new("RGB", (64, 64), (30, 30, 200)).save(items / "blue.png")
    (items / "memo.md").write_text("quarterly revenue table")
    Image.new("RGB", (8, 8), "black").save(tmp_path / "secret.png")
    ingest(tmp_path / "ix", serve_model, items, progress=False)
    return tmp_path


def test_page_and_its_files_are_served_and_nothing_else(make_client):
    client = make_client()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="budget"' in page.text and "static/page.js" in page.text and "http" not in page.text.lower()
    script = client.get("/static/page.js")
    assert script.status_code == 200 and "v1/search" in script.text
    assert client.get("/static/page.css").headers["content-type"].startswith("text/css")
    for name in ("..%2Fpage.py", "page.py", "%2Fetc%2Fpasswd", "missing.js"):
        assert client.get(f"/static/{name}").status_code == 404, name


def test_budgets_list_the_ladder_with_bytes_and_card_quality(make_client, serve_model, gallery):
    from metaembed.index import open_index

    index = open_index(gallery / "ix")
    body = make_client(index=index, quality=QUALITY, image_dir=gallery / "items").get("/v1/budgets").json()
    assert [b["budget"] for b in body["budgets"]] == ["1x1", "2x4", "4x8", "8x16", "16x64"]
    assert body["default"] == "4x8" and body["index_size"] == 3 and body["thumbnails"] is True
    per_vector = serve_model.embedding_dim * 2  # bf16
    assert [b["index_bytes"] for b in body["budgets"]] == [3 * r_c * per_vector for r_c in (1, 4, 8, 16, 64)]
    assert body["budgets"][0]["quality"] == {"P@1": 0.25} and body["budgets"][1]["quality"] == {}
    assert make_client().get("/v1/budgets").json()["index_size"] is None


def test_search_reports_bytes_read_and_takes_an_int_budget(make_client, gallery):
    from metaembed.index import open_index

    client = make_client(index=open_index(gallery / "ix"))
    as_int = client.post("/v1/search", json={"query": "red", "budget": 2, "k": 3}).json()
    as_str = client.post("/v1/search", json={"query": "red", "budget": "2x2", "k": 3}).json()
    assert as_int["budget"] == "2x2" and as_int["results"] == as_str["results"]
    assert as_int["index_bytes_read"] == 3 * 2 * client.get("/health").json()["dim"] * 2


def test_thumbnails_only_for_indexed_images_under_the_image_dir(make_client, gallery):
    from metaembed.index import open_index

    index = open_index(gallery / "ix")
    client = make_client(index=index, image_dir=gallery / "items")
    thumb = client.get("/v1/thumbnail", params={"id": "red.png"})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumb.content)).size == (256, 171)  # at most 256 px a side, aspect kept
    for item_id, status, says in [
        ("memo.md", 404, "no image"),
        ("../secret.png", 404, "not in the index"),
        ("nope.png", 404, "not in the index"),
    ]:
        response = client.get("/v1/thumbnail", params={"id": item_id})
        assert response.status_code == status and says in response.json()["error"]["message"], response.text
    narrower = make_client(index=index, image_dir=gallery / "items" / "..")
    assert narrower.get("/v1/thumbnail", params={"id": "red.png"}).status_code == 200  # any folder above works
    elsewhere = gallery / "elsewhere"
    elsewhere.mkdir()
    outside = make_client(index=index, image_dir=elsewhere)
    response = outside.get("/v1/thumbnail", params={"id": "red.png"})
    assert response.status_code == 403 and "outside" in response.json()["error"]["message"]
    off = make_client(index=index).get("/v1/thumbnail", params={"id": "red.png"})
    assert off.status_code == 404 and "--image-dir" in off.json()["error"]["message"]


def test_metaembed_serve_shows_the_model_cards_quality(tiny_checkpoint, tmp_path):
    from fastapi.testclient import TestClient

    from metaembed import MetaEmbedModel
    from metaembed.cli import build_parser
    from metaembed.serve.cli import build

    checkpoint = MetaEmbedModel.from_pretrained(tiny_checkpoint).save_pretrained(tmp_path / "m", quality=QUALITY)
    args = build_parser().parse_args(["serve", "--model", str(checkpoint), "--index", str(tmp_path / "ix")])
    with TestClient(build(args)) as client:
        budgets = {b["budget"]: b["quality"] for b in client.get("/v1/budgets").json()["budgets"]}
    assert budgets["1x1"] == {"P@1": 0.25} and budgets["4x8"] == {"P@1": 0.5} and budgets["16x64"] == {}
