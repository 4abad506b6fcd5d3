"""`metaembed eval` end to end on the tiny random model: printed tables, JSON, plots, one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import pytrec_eval
import torch
from PIL import Image

from metaembed import Budget, MetaEmbedModel
from metaembed.cli import main
from metaembed.eval.report import EvalResult
from metaembed.scoring import maxsim_reference


@pytest.fixture
def checkpoint(tiny_model, tmp_path):
    return tiny_model.save_pretrained(tmp_path / "ckpt")


def test_mmeb_cli_on_the_tiny_model_matches_per_query_maxsim(checkpoint, mmeb_data, tmp_path, capsys):
    eval_dir, root, rows = mmeb_data
    out = tmp_path / "out"
    code = main(["eval", "mmeb", "--model", str(checkpoint), "--data", str(eval_dir), "--image-root", str(root),
                 "--out", str(out), "--device", "cpu", "--batch-size", "4", "--label", "tiny"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    result = EvalResult.load(out / "mmeb.json")
    assert (out / "mmeb.md").read_text() == printed.rstrip("\n") + "\n"
    assert result.model["label"] == "tiny" and result.embedding_dim == 64
    model = MetaEmbedModel.from_pretrained(checkpoint)
    for name, records in rows.items():
        ranks = {str(b): [] for b in Budget.LADDER}
        for row in records:
            query = {"text": row["qry_text"], "image": root / row["qry_img_path"] if row["qry_img_path"] else None}
            images = row["tgt_img_path"] or [""] * len(row["tgt_text"])
            keys = list(dict.fromkeys(zip(row["tgt_text"], images, strict=True)))
            candidates = [{"text": t or None, "image": root / i if i else None} for t, i in keys]
            q = model.encode_queries([query]).double()
            c = model.encode_candidates(candidates).double()
            for budget in Budget.LADDER:
                scores = maxsim_reference(q, c, budget)[0]
                margin = (scores[1:] - scores[0]).abs().min().item()
                assert margin > 1e-4, "a near-tie would make the comparison fragile"
                ranks[str(budget)].append(int((scores >= scores[0]).sum()))
        for budget, values in ranks.items():
            assert result.value(name, budget) == sum(r == 1 for r in values) / len(values)
            assert result.value(name, budget, "mrr") == pytest.approx(sum(1 / r for r in values) / len(values))
            assert f"{100 * result.value(name, budget):.1f}" in printed
    capsys.readouterr()
    assert main(["eval", "mmeb", "--model", str(checkpoint), "--data", str(eval_dir), "--image-root", str(root),
                 "--out", str(out), "--device", "cpu", "--label", "tiny"]) == 0  # fmt: skip
    rerun = capsys.readouterr()
    assert rerun.err.count("reusing the stored result") == 4 and "encoding" not in rerun.err
    assert EvalResult.load(out / "mmeb.json").scores == result.scores
    overall = [result.group_value("overall", b) for b in result.budgets]
    assert overall == [pytest.approx(sum(result.value(n, b) for n in rows) / 4) for b in result.budgets]


def test_vidore_cli_on_the_tiny_model_matches_pytrec_eval(checkpoint, vidore_data, tmp_path, capsys):
    out = tmp_path / "out"
    folder = vidore_data / "esg_reports_human_labeled_v2"
    code = main(["eval", "vidore", "--model", str(checkpoint), "--data", str(folder), "--budgets", "1x1", "16x64",
                 "--out", str(out), "--device", "cpu"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    result = EvalResult.load(out / "vidore.json")
    assert result.budgets == ["1x1", "16x64"]
    model = MetaEmbedModel.from_pretrained(checkpoint)
    corpus = [json.loads(line) for line in (folder / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (folder / "queries.jsonl").read_text().splitlines()]
    qrels = {}
    for line in (folder / "qrels.jsonl").read_text().splitlines():
        row = json.loads(line)
        qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = row["score"]
    queries = [q for q in queries if q["query-id"] in qrels]
    pages = torch.cat([model.encode_candidates([folder / c["image"]]) for c in corpus]).double()
    vectors = torch.cat([model.encode_queries([q["query"]]) for q in queries]).double()
    for budget in result.budgets:
        scores = maxsim_reference(vectors, pages, budget)
        run = {q["query-id"]: {c["corpus-id"]: float(scores[i, j]) for j, c in enumerate(corpus)}
               for i, q in enumerate(queries)}  # fmt: skip
        per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.5"}).evaluate(run)
        expected = sum(v["ndcg_cut_5"] for v in per_query.values()) / len(per_query)
        assert result.value("esg_reports_human_labeled_v2", budget) == pytest.approx(expected, abs=1e-5)
        assert f"{100 * expected:.1f}" in printed


def _fake_result(label, budgets, values, path):
    result = EvalResult(benchmark="mmeb", model={"name": label}, main_metric="precision_at_1", budgets=budgets,
                        embedding_dim=64,
                        datasets=[{"name": "A", "id": "local", "revision": None, "category": "VQA", "split": "IND"}],
                        scores=[dict(task="A", budget=b, metric="precision_at_1", value=v)
                                for b, v in zip(budgets, values, strict=True)],
                        groups=[dict(group="overall", budget=b, metric="precision_at_1", value=v, num_tasks=1)
                                for b, v in zip(budgets, values, strict=True)])  # fmt: skip
    return result.to_json(path)


def test_plot_overlays_mmr_nommr_and_single_vector(tmp_path, capsys):
    ladder = [str(b) for b in Budget.LADDER]
    files = [
        _fake_result("MMR", ladder, [0.60, 0.64, 0.66, 0.68, 0.70], tmp_path / "mmr.json"),
        _fake_result("NoMMR", ladder, [0.45, 0.55, 0.62, 0.67, 0.69], tmp_path / "nommr.json"),
        _fake_result("single-last", ["1x1"], [0.62], tmp_path / "single.json"),
    ]
    out = tmp_path / "plots" / "budget.png"
    assert main(["eval", "plot", *map(str, files), "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size[0] > 600 and image.size[1] > 300
    assert main(["eval", "table", str(files[2])]) == 0
    table = capsys.readouterr().out
    assert "| 1x1 | 128 | 62.0 |" in table  # bytes/item = r_c · D · 2 (bf16) = 1 · 64 · 2
    loaded = EvalResult.load(files[0])
    assert loaded.bytes_per_item("16x64") == 64 * 64 * 2
    assert math.isclose(loaded.group_value("overall", "4x8"), 0.66)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "mmeb", "--model", "m", "--data", "/nonexistent/dir"], "neither a folder nor a hub id"),
        (["eval", "mmeb", "--model", "m", "--data", ".", "--budgets", "4y8"], "cannot read budget"),
        (["eval", "vidore", "--model", "m", "--data", "/nonexistent/dir"], "not a folder"),
        (["eval", "plot", "/nonexistent.json", "--out", "x.png"], "does not exist"),
    ],
)
def test_bad_arguments_give_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_budgets_that_do_not_fit_fail_before_encoding(checkpoint, mmeb_data, capsys):
    eval_dir, root, _ = mmeb_data
    code = main(["eval", "mmeb", "--model", str(checkpoint), "--data", str(eval_dir), "--image-root", str(root),
                 "--budgets", "32x64", "--device", "cpu"])  # fmt: skip
    assert code == 2
    assert "32x64" in capsys.readouterr().err


def test_plot_legend_labels_stay_apart_for_equal_model_names(tmp_path):
    from metaembed.eval.report import _unique_labels

    a = _fake_result("tiny", ["1x1"], [0.5], tmp_path / "mmr" / "mmeb.json")
    b = _fake_result("tiny", ["1x1"], [0.4], tmp_path / "nommr" / "mmeb.json")
    loaded = [EvalResult.load(a), EvalResult.load(b)]
    assert _unique_labels(loaded, [a, b]) == ["tiny (mmr/mmeb)", "tiny (nommr/mmeb)"]
