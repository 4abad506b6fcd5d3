"""The main job end to end on a small dataset in the built-data layout, checked against exact MaxSim."""

from __future__ import annotations

import json

import torch
from PIL import Image

from metaembed import maxsim
from metaembed.cli import main

COLOURS = [(220, 20, 20), (20, 200, 20), (20, 20, 220), (230, 230, 20), (20, 220, 220), (140, 40, 160)]


def _toy_source(root):
    """data/toy in the data builder's layout: images/, eval/toy_t2i.jsonl with gold first."""
    (root / "images").mkdir(parents=True)
    (root / "eval").mkdir()
    paths = []
    for i, colour in enumerate(COLOURS):
        paths.append(f"images/{i}.png")
        Image.new("RGB", (40, 32), colour).save(root / paths[-1])
    with open(root / "eval" / "toy_t2i.jsonl", "w") as out:
        for i, colour in enumerate(COLOURS[:4]):
            others = [p for j, p in enumerate(paths) if j != i]
            row = dict(qry_text=f"a swatch of colour {colour}", qry_img_path="", tgt_text=["Represent the image."] * 6,
                       tgt_img_path=[paths[i], *others])  # fmt: skip
            out.write(json.dumps(row) + "\n")
    return paths


def test_demo_indexes_the_test_split_and_reports_every_budget(tiny_model, tmp_path, capsys):
    checkpoint = tiny_model.save_pretrained(tmp_path / "checkpoint")
    paths = _toy_source(tmp_path / "data" / "toy")
    args = ["demo", "--model", str(checkpoint), "--data", str(tmp_path / "data"), "--sources", "toy",
            "--index-dir", str(tmp_path / "index"), "--dtype", "fp32", "--json", str(tmp_path / "result.json"),
            "--plot", str(tmp_path / "plot.png"), "--compare"]  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "| toy_t2i | 6 | 16x64 |" in out and "| 1x1 |" in out
    assert "1 tasks, 10 queries and candidates to encode: about 1 min" in out and "done in" in out
    assert "encode query" in err and "encode candidate" in err  # progress bars even without a terminal
    assert (tmp_path / "plot.png").stat().st_size > 0 and (tmp_path / "index" / "toy_t2i").is_dir()

    result = json.loads((tmp_path / "result.json").read_text())
    queries = tiny_model.encode_queries([f"a swatch of colour {c}" for c in COLOURS[:4]])
    candidates = tiny_model.encode_candidates(
        [{"text": "Represent the image.", "image": tmp_path / "data" / "toy" / p} for p in paths]
    )
    for budget in ("1x1", "2x4", "4x8", "8x16", "16x64"):
        scores = maxsim(queries, candidates, budget)
        expected_p1 = (scores.argmax(dim=1) == torch.arange(4)).float().mean().item()
        rank_of_gold = (scores > scores.diagonal()[:, None]).sum(dim=1)
        expected_r5 = (rank_of_gold < 5).float().mean().item()
        row = {r["metric"]: r["value"] for r in result["scores"] if r["budget"] == budget}
        assert row["precision_at_1"] == expected_p1 and row["recall_at_5"] == expected_r5
        assert row["index_bytes"] == 6 * int(budget.split("x")[1]) * tiny_model.embedding_dim * 4
