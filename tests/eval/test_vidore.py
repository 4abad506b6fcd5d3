"""ViDoRe runner: full-corpus nDCG@5 at every budget, checked against pytrec_eval over float64 MaxSim."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import pytrec_eval
import torch
from PIL import Image

from metaembed import Budget
from metaembed.errors import DataError
from metaembed.eval.vidore import V2_TASKS, build_dataset, evaluate_vidore, resolve_tasks
from metaembed.scoring import maxsim_reference


def read_table(folder: Path, part: str) -> list[dict]:
    if (folder / f"{part}.jsonl").is_file():
        return [json.loads(line) for line in (folder / f"{part}.jsonl").read_text().splitlines()]
    import pyarrow.parquet as pq

    return [row for f in sorted((folder / part).glob("*.parquet")) for row in pq.read_table(f).to_pylist()]


def reference(encoder, folder: Path, languages, budget):
    """pytrec_eval over a run scored one page at a time with float64 MaxSim."""
    corpus, queries, qrels_rows = (read_table(folder, p) for p in ("corpus", "queries", "qrels"))
    names = {"en": "eng", "english": "eng", "french": "fra", "german": "deu", "spanish": "spa"}
    queries = [q for q in queries if languages is None or names.get(q["language"], q["language"]) in languages]
    qrels = {}
    for row in qrels_rows:
        qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = row["score"]
    page_vectors = {}
    for row in corpus:
        image = row["image"]
        image = Image.open(io.BytesIO(image["bytes"])) if isinstance(image, dict) else folder / image
        page_vectors[row["corpus-id"]] = encoder.encode_candidates([{"text": None, "image": image}])[0].double()
    run = {}
    for q in queries:
        if q["query-id"] not in qrels:
            continue
        qv = encoder.encode_queries([{"text": q["query"], "image": None}])[0].double()
        scores = {d: maxsim_reference(qv[None], v[None], budget)[0, 0] for d, v in page_vectors.items()}
        run[q["query-id"]] = {d: float(s) for d, s in scores.items()}
    judged = {q: qrels[q] for q in run}
    per_query = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.5,10", "recall.1,5", "recip_rank"}).evaluate(run)
    keys = {
        "ndcg_at_5": "ndcg_cut_5",
        "ndcg_at_10": "ndcg_cut_10",
        "recall_at_1": "recall_1",
        "recall_at_5": "recall_5",
        "mrr": "recip_rank",
    }
    return {ours: sum(v[theirs] for v in per_query.values()) / len(per_query) for ours, theirs in keys.items()}, len(
        per_query
    )


def test_every_number_matches_pytrec_eval_over_independent_scores(vidore_data, table_encoder):
    encoder = table_encoder()
    tasks = resolve_tasks(vidore_data)
    assert [t.name for t in tasks] == [
        "esg_human", "esg_synthetic", "esg_synthetic_multilingual", "economics", "economics_multilingual",
    ]  # fmt: skip
    result = evaluate_vidore(encoder, tasks, model_name="table")
    spec = {t.name: t for t in V2_TASKS}
    folders = {"esg_human": "esg_reports_human_labeled_v2", "esg_synthetic": "esg_reports_v2",
               "esg_synthetic_multilingual": "esg_reports_v2", "economics": "economics_reports_v2",
               "economics_multilingual": "economics_reports_v2"}  # fmt: skip
    expected = {}
    for name, folder in folders.items():
        for budget in Budget.LADDER:
            values, n = reference(encoder, vidore_data / folder, spec[name].languages, budget)
            expected[(name, str(budget))] = values
            for metric, value in values.items():
                assert result.value(name, budget, metric) == pytest.approx(value, abs=1e-9), (name, budget, metric)
        assert {d["name"]: d["num_queries"] for d in result.datasets}[name] == n
    for group, members in {
        "overall": list(folders),
        "english": ["esg_human", "esg_synthetic", "economics"],
        "multilingual": ["esg_synthetic_multilingual", "economics_multilingual"],
    }.items():
        for budget in result.budgets:
            value = sum(expected[(m, budget)]["ndcg_at_5"] for m in members) / len(members)
            assert result.group_value(group, budget) == pytest.approx(value, abs=1e-12)
    english = {d["name"]: d for d in result.datasets}
    assert english["esg_synthetic"]["num_queries"] < english["esg_synthetic_multilingual"]["num_queries"]
    assert english["economics"]["revision"].startswith("sha256:")
    assert result.encodes["candidate_encodes"] == 7 + 9 + 9 + 8 + 8
    assert result.encodes["naive_candidate_encodes"] == 5 * result.encodes["candidate_encodes"]


def test_hand_computed_graded_ndcg(tmp_path, table_encoder):
    pages = tmp_path / "pages"
    pages.mkdir()
    table = {("query", ("q", None)): [[1.0, 0.0]]}
    for doc, value in {"p0": 0.9, "p1": 0.5, "p2": 0.7}.items():
        Image.new("RGB", (8, 8)).save(pages / f"{doc}.png")
        table[("candidate", (None, f"pages/{doc}.png"))] = [[value, 0.0]]
    dataset = build_dataset(
        "hand", "inline", None,
        corpus=[{"corpus-id": d, "image": f"pages/{d}.png"} for d in ("p0", "p1", "p2")],
        queries=[{"query-id": "q0", "query": "q"}],
        qrels=[{"query-id": "q0", "corpus-id": "p1", "score": 2}, {"query-id": "q0", "corpus-id": "p2", "score": 1}],
        image_root=tmp_path,
    )  # fmt: skip
    result = evaluate_vidore(table_encoder(num_query=1, num_candidate=1, dim=2, table=table), [dataset])
    assert result.budgets == ["1x1"]
    # ranking p0 (0.9), p2 (0.7, gain 1), p1 (0.5, gain 2)
    dcg = 1 / math.log2(3) + 2 / math.log2(4)
    ideal = 2 + 1 / math.log2(3)
    assert result.value("hand", "1x1") == pytest.approx(dcg / ideal)
    assert result.value("hand", "1x1", "mrr") == pytest.approx(0.5)
    assert result.value("hand", "1x1", "recall_at_1") == 0.0


def test_bad_beir_data_is_rejected(vidore_data, tmp_path):
    with pytest.raises(DataError, match="unknown ViDoRe task"):
        resolve_tasks(vidore_data, ["nope"])
    with pytest.raises(DataError, match="neither"):
        resolve_tasks(vidore_data, ["biomedical"])
    with pytest.raises(DataError, match="not in the corpus"):
        build_dataset(
            "x",
            "x",
            None,
            [{"corpus-id": 1, "image": {"bytes": b"x"}}],
            [{"query-id": 1, "query": "q"}],
            [{"query-id": 1, "corpus-id": 2, "score": 1}],
        )
    with pytest.raises(DataError, match="no query"):
        build_dataset(
            "x",
            "x",
            None,
            [{"corpus-id": 1, "image": {"bytes": b"x"}}],
            [{"query-id": 1, "query": "q", "language": "fra"}],
            [{"query-id": 1, "corpus-id": 1, "score": 1}],
            languages=["eng"],
        )
    with pytest.raises(DataError, match="does not exist"):
        build_dataset("x", "x", None, [{"corpus-id": 1, "image": "missing.png"}], [], [], image_root=tmp_path)
    with pytest.raises(DataError, match="repeats"):
        build_dataset("x", "x", None, [{"corpus-id": 1, "image": {"bytes": b"x"}}],
                      [{"query-id": 1, "query": "q"}, {"query-id": 1, "query": "r"}], [])  # fmt: skip
    with pytest.raises(DataError, match="holds no BEIR"):
        resolve_tasks(tmp_path)


def test_single_beir_folder_and_named_tasks(vidore_data, table_encoder):
    (only,) = resolve_tasks(vidore_data / "economics_reports_v2", languages=["eng"])
    assert only.name == "economics_reports_v2" and len(only.query_ids) == 3
    named = resolve_tasks(vidore_data, ["economics", "esg_reports_v2"])
    assert [t.name for t in named] == ["economics", "esg_reports_v2"]
    assert torch.equal(torch.tensor([len(t.query_ids) for t in named]), torch.tensor([3, 6]))


def _beir(folder: Path, corpus: str, queries: str, qrels: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
        (folder / f"{name}.jsonl").write_text(text)
    return folder


GOOD_CORPUS = '{"corpus-id": "p1", "text": "page one"}\n{"corpus-id": "p2", "text": "page two"}\n'
GOOD_QUERIES = '{"query-id": "q1", "query": "one"}\n'
GOOD_QRELS = '{"query-id": "q1", "corpus-id": "p1", "score": 2}\n'


@pytest.mark.parametrize(
    ("part", "text", "line", "message"),
    [
        ("corpus", GOOD_CORPUS + "\n" + '{"text": "no id"}\n', 4, "needs 'corpus-id'"),
        ("corpus", GOOD_CORPUS + '{"corpus-id": "p1", "text": "x"}\n', 3, r"'p1' repeats \(first at .*:1\)"),
        ("corpus", '{"corpus-id": "p1", "image": "pages/missing.png"}\n', 1, "'pages/missing.png' does not exist"),
        ("corpus", '{"corpus-id": "p1", "image": 7}\n', 1, "'image' must be a path"),
        ("queries", GOOD_QUERIES + "{broken\n", 2, "invalid JSON"),
        ("queries", GOOD_QUERIES + '["q2"]\n', 2, "a record must be a JSON object"),
        ("queries", GOOD_QUERIES + '{"query-id": "q1", "query": "twice"}\n', 2, "query-id 'q1' repeats"),
        ("qrels", GOOD_QRELS + '{"query-id": "q1", "corpus-id": "p9", "score": 1}\n', 2, "'p9' is not in the corpus"),
        ("qrels", GOOD_QRELS + '{"query-id": "q1", "corpus-id": "p2"}\n', 2, "needs 'query-id', 'corpus-id', 'score'"),
        ("qrels", GOOD_QRELS + '{"query-id": "q1", "corpus-id": "p2", "score": "high"}\n', 2, "must be a whole number"),
        ("qrels", GOOD_QRELS + '{"query-id": "q1", "corpus-id": "p2", "score": 1.5}\n', 2, "must be a whole number"),
    ],
)  # fmt: skip
def test_a_broken_local_dataset_names_its_file_and_line(tmp_path, part, text, line, message):
    parts = {"corpus": GOOD_CORPUS, "queries": GOOD_QUERIES, "qrels": GOOD_QRELS, part: text}
    folder = _beir(tmp_path / "broken", parts["corpus"], parts["queries"], parts["qrels"])
    with pytest.raises(DataError, match=rf"^{folder / part}.jsonl:{line}: .*{message}"):
        resolve_tasks(folder)


def test_a_broken_parquet_part_names_its_file_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = _beir(tmp_path / "broken", GOOD_CORPUS, GOOD_QUERIES, "")
    (folder / "qrels.jsonl").unlink()
    qrels = [{"query-id": "q1", "corpus-id": "p1", "score": 1}, {"query-id": "q1", "corpus-id": "p7", "score": 1}]
    for number, rows in enumerate((qrels[:1], qrels[1:])):
        (folder / "qrels").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), folder / "qrels" / f"test-{number:05d}-of-00002.parquet")
    broken = folder / "qrels" / "test-00001-of-00002.parquet"
    with pytest.raises(DataError, match=rf"^{broken} row 0: corpus-id 'p7' is not in the corpus"):
        resolve_tasks(folder)
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=rf"cannot read parquet file {broken}"):
        resolve_tasks(folder)


def test_build_dataset_positions_must_fit_the_rows():
    rows = (
        [{"corpus-id": 1, "text": "t"}],
        [{"query-id": 1, "query": "q"}],
        [{"query-id": 1, "corpus-id": 1, "score": 1}],
    )
    assert build_dataset("x", "x", None, *rows, where={"corpus": ["c.jsonl:1"]}).qrels == {"1": {"1": 1}}
    with pytest.raises(DataError, match="2 positions for 1 corpus rows"):
        build_dataset("x", "x", None, *rows, where={"corpus": ["a", "b"]})
    with pytest.raises(DataError, match=r"where= names parts \['pages'\]"):
        build_dataset("x", "x", None, *rows, where={"pages": ["a"]})
    with pytest.raises(DataError, match=r"^x corpus row 0: needs 'corpus-id'"):
        build_dataset("x", "x", None, [{"text": "t"}], *rows[1:])
