"""Ranking metrics: hit@k (Precision@1), precision@k, recall@k, nDCG@k with graded relevance, MRR.

Measures are named ``ndcg_at_5``, ``recall_at_1``, ``precision_at_1``, ``hit_at_5``, ``mrr`` — the names
result files store; the trec-style ``ndcg@5`` is accepted as input and read as ``ndcg_at_5``.

Conventions are trec_eval's (and so pytrec_eval's and mteb's), so numbers compare with published ones:

* a document is relevant when its qrel score is ≥ ``relevance_level`` (1);
* nDCG gain is the qrel score itself (linear, not 2^rel − 1), discount ``log2(rank + 1)``, normalised by
  the ideal ordering of **all** judged documents of the query (retrieved or not); nDCG is 0 when the
  ideal DCG is 0;
* precision@k divides by k even when fewer than k documents were retrieved; recall@k divides by the
  number of relevant judged documents (0 when there are none); MRR is 1 / rank of the first relevant
  document over the whole ranking (0 if none);
* ties in score are broken by document id, **descending** (trec_eval's ``strcmp`` order);
* only queries that appear in both the run and the qrels are evaluated.

The MMEB protocol is different (one gold per query, ranked among its own candidates) and uses
:func:`pessimistic_rank`, where a tie with the gold counts against it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from metaembed.errors import EvalError

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

# ``ndcg_at_5`` is the spelling result files have always stored; ``ndcg@5`` (trec-style) is still read.
_MEASURE = re.compile(r"^(ndcg|recall|precision|hit)(?:_at_|@)(\d+)$|^(mrr)$")


class MetricError(EvalError):
    """A measure name that cannot be parsed, or rankings and qrels that do not fit together."""


def parse_measure(name: str) -> tuple[str, int | None]:
    """``"ndcg_at_5"`` (or ``"ndcg@5"``) → ``("ndcg", 5)``; ``"mrr"`` → ``("mrr", None)``."""
    match = _MEASURE.match(name.strip().lower())
    if match is None:
        raise MetricError(
            f"unknown measure {name!r}; allowed: ndcg_at_K, recall_at_K, precision_at_K, hit_at_K, mrr (K ≥ 1)"
        )
    if match.group(3):
        return "mrr", None
    k = int(match.group(2))
    if k < 1:
        raise MetricError(f"measure {name!r}: the cutoff K must be at least 1")
    return match.group(1), k


def canonical_measure(name: str) -> str:
    """The one spelling results use: ``ndcg_at_5`` for ``ndcg@5`` or ``NDCG_at_5``; ``mrr``."""
    kind, k = parse_measure(name)
    return kind if k is None else f"{kind}_at_{k}"


# ------------------------------------------------------------------------------------ per ranking
def hit_at_k(ranked_relevant: Sequence[bool], k: int) -> float:
    """1.0 if any of the first k ranked documents is relevant (hit@1 = MMEB's Precision@1)."""
    return 1.0 if any(ranked_relevant[:k]) else 0.0


def precision_at_k(ranked_relevant: Sequence[bool], k: int) -> float:
    """Relevant documents among the first k, divided by k."""
    return sum(bool(r) for r in ranked_relevant[:k]) / k


def recall_at_k(ranked_relevant: Sequence[bool], num_relevant: int, k: int) -> float:
    """Relevant documents among the first k, divided by all relevant judged documents (0 if none)."""
    if num_relevant <= 0:
        return 0.0
    return sum(bool(r) for r in ranked_relevant[:k]) / num_relevant


def reciprocal_rank(ranked_relevant: Sequence[bool]) -> float:
    """1 / rank of the first relevant document (ranks start at 1); 0 if none is relevant."""
    for position, relevant in enumerate(ranked_relevant):
        if relevant:
            return 1.0 / (position + 1)
    return 0.0


def dcg_at_k(gains: Sequence[float], k: int) -> float:
    """Σ_{i<k} gain_i / log2(i + 2) over the ranking's first k gains."""
    return sum(float(g) / math.log2(i + 2) for i, g in enumerate(gains[:k]) if g > 0)


def ndcg_at_k(ranked_gains: Sequence[float], judged_gains: Iterable[float], k: int) -> float:
    """DCG@k of the ranking over DCG@k of the ideal ordering of every judged gain (0 if that is 0)."""
    ideal = dcg_at_k(sorted((g for g in judged_gains if g > 0), reverse=True), k)
    return dcg_at_k(ranked_gains, k) / ideal if ideal > 0 else 0.0


def pessimistic_rank(scores: np.ndarray | Sequence[float], gold: int = 0) -> int:
    """Rank (from 1) of ``scores[gold]`` when every other candidate with an equal score ranks above it.

    This is the MMEB convention here: the data put the gold first, so a tie must not favour it.
    """
    values = np.asarray(scores)
    if values.ndim != 1 or not 0 <= gold < values.shape[0]:
        raise MetricError(f"gold index {gold} does not fit scores of shape {values.shape}")
    if np.isnan(values).any():
        raise MetricError("scores contain NaN; a ranking needs finite scores")
    return int((values >= values[gold]).sum())


# ------------------------------------------------------------------------------------ run / qrels
def trec_order(doc_ids: Sequence[str], scores: Sequence[float] | np.ndarray) -> list[int]:
    """Indices of ``doc_ids`` in ranking order: score descending, ties by id descending (trec_eval)."""
    values = _finite(scores, (len(doc_ids),))
    return np.lexsort((_descending_id_rank(doc_ids), -values)).tolist()


def _finite(scores: Sequence[float] | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64)
    if values.shape != shape:
        raise MetricError(f"scores have shape {values.shape}, expected {shape} (one per query and document)")
    if np.isnan(values).any():
        raise MetricError("scores contain NaN; a ranking needs finite scores")
    return values


def _descending_id_rank(doc_ids: Sequence[str]) -> np.ndarray:
    """Position of each id in descending id order: the secondary sort key of trec_eval."""
    by_id = sorted(range(len(doc_ids)), key=lambda i: doc_ids[i], reverse=True)
    rank = np.empty(len(doc_ids), dtype=np.int64)
    rank[by_id] = np.arange(len(doc_ids))
    return rank


def measure_ranking(
    ranked_ids: Sequence[str], judged: Mapping[str, int], measures: Sequence[str], relevance_level: int = 1
) -> dict[str, float]:
    """Every measure of one query's ranking against its qrels (doc id → graded score), keyed by
    :func:`canonical_measure` names."""
    gains = [max(float(judged.get(doc, 0)), 0.0) for doc in ranked_ids]
    relevant = [judged.get(doc, 0) >= relevance_level for doc in ranked_ids]
    num_relevant = sum(1 for score in judged.values() if score >= relevance_level)
    out: dict[str, float] = {}
    for measure in measures:
        kind, k = parse_measure(measure)
        name = canonical_measure(measure)
        if kind == "ndcg":
            out[name] = ndcg_at_k(gains, judged.values(), k)
        elif kind == "recall":
            out[name] = recall_at_k(relevant, num_relevant, k)
        elif kind == "precision":
            out[name] = precision_at_k(relevant, k)
        elif kind == "hit":
            out[name] = hit_at_k(relevant, k)
        else:
            out[name] = reciprocal_rank(relevant)
    return out


def evaluate_run(
    run: Run, qrels: Qrels, measures: Sequence[str], relevance_level: int = 1
) -> dict[str, dict[str, float]]:
    """Per-query measures of a run (query → doc → score) against qrels (query → doc → graded int).

    Same semantics as ``pytrec_eval.RelevanceEvaluator(qrels, ...).evaluate(run)``.
    """
    for name in measures:
        parse_measure(name)
    out = {}
    for query_id in sorted(run):
        if query_id not in qrels:
            continue
        docs = list(run[query_id])
        order = trec_order(docs, [run[query_id][doc] for doc in docs])
        out[query_id] = measure_ranking([docs[i] for i in order], qrels[query_id], measures, relevance_level)
    return out


def evaluate_dense(
    scores: np.ndarray,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    qrels: Qrels,
    measures: Sequence[str],
    relevance_level: int = 1,
) -> dict[str, dict[str, float]]:
    """Per-query measures of a full score matrix ``(n_queries, n_docs)``: every document is retrieved."""
    values = _finite(scores, (len(query_ids), len(doc_ids)))
    id_rank = _descending_id_rank(doc_ids)
    out = {}
    for row, query_id in enumerate(query_ids):
        if query_id not in qrels:
            continue
        order = np.lexsort((id_rank, -values[row]))
        out[query_id] = measure_ranking([doc_ids[i] for i in order], qrels[query_id], measures, relevance_level)
    return out


def mean_over_queries(per_query: Mapping[str, Mapping[str, float]], measures: Sequence[str]) -> dict[str, float]:
    """Plain mean of each measure over the evaluated queries (NaN-free; raises if there are none)."""
    if not per_query:
        raise MetricError("no query was evaluated: the run and the qrels share no query id")
    names = [canonical_measure(m) for m in measures]
    return {name: float(np.mean([values[name] for values in per_query.values()])) for name in names}
