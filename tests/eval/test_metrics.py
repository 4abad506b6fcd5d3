"""Metrics equal pytrec_eval (trec_eval) on random runs, ties and missing documents included."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import pytrec_eval

from metaembed.eval.metrics import (
    MetricError,
    canonical_measure,
    evaluate_dense,
    evaluate_run,
    mean_over_queries,
    ndcg_at_k,
    parse_measure,
    pessimistic_rank,
    trec_order,
)

CUTOFFS = (1, 3, 5, 10)
OURS = [f"ndcg_at_{k}" for k in CUTOFFS] + [f"recall_at_{k}" for k in CUTOFFS] + [f"precision_at_{k}" for k in CUTOFFS]
OURS += [f"hit_at_{k}" for k in CUTOFFS] + ["mrr"]
TREC = {"ndcg": "ndcg_cut_{k}", "recall": "recall_{k}", "precision": "P_{k}", "hit": "success_{k}"}


def _trec_name(name: str) -> str:
    kind, k = parse_measure(name)
    return "recip_rank" if kind == "mrr" else TREC[kind].format(k=k)


def _random_case(rng: random.Random, ties: bool):
    run, qrels = {}, {}
    for q in range(rng.randint(1, 12)):
        docs = [f"d{rng.randint(0, 60)}" for _ in range(rng.randint(1, 25))]
        docs = list(dict.fromkeys(docs))
        scores = {d: (rng.randint(0, 4) / 4 if ties else rng.uniform(-3, 3)) for d in docs}
        judged = {}
        for d in rng.sample(docs, rng.randint(0, len(docs))):
            judged[d] = rng.randint(0, 3)
        for _ in range(rng.randint(0, 3)):  # relevant documents the run never retrieved
            judged[f"x{rng.randint(0, 99)}"] = rng.randint(0, 3)
        if not judged:
            judged[docs[0]] = rng.randint(1, 3)
        run[f"q{q}"] = scores
        qrels[f"q{q}"] = judged
    if rng.random() < 0.3:
        run["unjudged"] = {"d0": 1.0}
    return run, qrels


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(25))
def test_equals_pytrec_eval_on_random_runs(seed, ties):
    run, qrels = _random_case(random.Random(seed * 2 + ties), ties)
    trec_measures = {"ndcg_cut.1,3,5,10", "recall.1,3,5,10", "P.1,3,5,10", "success.1,3,5,10", "recip_rank"}
    expected = pytrec_eval.RelevanceEvaluator(qrels, trec_measures).evaluate(run)
    got = evaluate_run(run, qrels, OURS)
    assert set(got) == set(expected)
    for query, values in got.items():
        for name in OURS:
            assert values[name] == pytest.approx(expected[query][_trec_name(name)], abs=1e-9), (query, name)


def test_dense_equals_run_form():
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=(6, 30)), 1)  # rounding makes ties
    docs = [f"p{i:02d}" for i in range(30)]
    queries = [f"q{i}" for i in range(6)]
    qrels = {q: {docs[j]: int(rng.integers(0, 3)) for j in rng.choice(30, 5, replace=False)} for q in queries[:5]}
    run = {q: {d: float(scores[i, j]) for j, d in enumerate(docs)} for i, q in enumerate(queries)}
    assert evaluate_dense(scores, queries, docs, qrels, OURS) == evaluate_run(run, qrels, OURS)


def test_hand_computed_ndcg_with_ties():
    # c (0.9) first; a and b tie at 0.5 and trec_eval puts the larger id first: b, then a.
    run = {"q": {"a": 0.5, "b": 0.5, "c": 0.9, "d": 0.1}}
    qrels = {"q": {"a": 2, "b": 0, "c": 1}}
    got = evaluate_run(run, qrels, ["ndcg_at_2", "ndcg@3", "mrr", "recall_at_2", "precision_at_2"])["q"]
    ideal2 = 2 + 1 / math.log2(3)
    assert got["ndcg_at_2"] == pytest.approx(1 / ideal2)
    assert got["ndcg_at_3"] == pytest.approx((1 + 2 / math.log2(4)) / ideal2)  # asked for as ndcg@3
    assert got["mrr"] == 1.0
    assert got["recall_at_2"] == 0.5
    assert got["precision_at_2"] == 0.5
    assert ndcg_at_k([0, 0], [0, 0], 5) == 0.0


def test_trec_order_breaks_ties_by_descending_id():
    assert trec_order(["a", "c", "b"], [1.0, 1.0, 2.0]) == [2, 1, 0]


def test_pessimistic_rank_counts_ties_against_the_gold():
    assert pessimistic_rank([0.5, 0.1, 0.2]) == 1
    assert pessimistic_rank([0.5, 0.5, 0.2]) == 2
    assert pessimistic_rank([0.5, 0.5, 0.5, 0.9]) == 4
    assert pessimistic_rank([0.1, 0.9], gold=1) == 1
    with pytest.raises(MetricError):
        pessimistic_rank([0.1, float("nan")])
    with pytest.raises(MetricError):
        pessimistic_rank([0.1], gold=3)


def test_bad_measures_and_empty_runs_are_rejected():
    for bad in ("ndcg", "ndcg@0", "ndcg_at_0", "map_at_5", "recall@x", "ndcg_5"):
        with pytest.raises(MetricError):
            parse_measure(bad)
    with pytest.raises(MetricError):
        mean_over_queries({}, ["mrr"])
    assert mean_over_queries({"a": {"mrr": 1.0}, "b": {"mrr": 0.5}}, ["mrr"]) == {"mrr": 0.75}


def test_one_spelling_out_whichever_comes_in():
    assert canonical_measure("ndcg@5") == canonical_measure("NDCG_at_5") == "ndcg_at_5"
    assert canonical_measure("hit@1") == "hit_at_1" and canonical_measure("mrr") == "mrr"
