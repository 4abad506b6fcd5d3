"""``POST /v1/search``: encode the query, score it against the index at the request's budget."""

from __future__ import annotations

import math
import time

from fastapi import APIRouter

from metaembed.auto_budget import AutoBudget, is_auto
from metaembed.budget import Budget
from metaembed.index.cost import search_bytes
from metaembed.serve import schemas
from metaembed.serve.checks import search_budget
from metaembed.serve.errors import BadRequestError
from metaembed.serve.service import Service


def search_router(service: Service) -> APIRouter:
    router = APIRouter()
    config = service.config

    responses = schemas.error_responses(_404="no index configured")

    @router.post("/v1/search", response_model=schemas.SearchResponse, responses=responses)
    def search(body: schemas.SearchRequest) -> schemas.SearchResponse:
        """Encode the query, score it against the index at ``budget`` with MaxSim, return the top ``k``."""
        start = time.perf_counter()
        store = service.require_index()
        shape = service.n_query, service.n_candidate
        auto = service.auto_policy() if is_auto(body.budget) else None  # beside the index, else with the model
        budget = auto.ceiling if auto else search_budget(body.budget, *shape)
        if body.k > config.max_k:
            raise BadRequestError(f"k={body.k}: at most {config.max_k}", "k")
        encoded = service.encode(service.parse_items([body.query], "query"), "query")
        encoded_at = time.perf_counter()
        queries = encoded.embeddings[:, : budget.r_q]
        # The index serialises its own ANN graph's growth; the read lock only keeps writes out.
        with service.index_lock.read():
            found, results = _search(store, queries, auto or budget, body.k, body.two_stage)
        done = time.perf_counter()
        read = results.bytes_read[0] if auto else search_bytes(store, budget, two_stage=body.two_stage, k=body.k)
        return schemas.SearchResponse(
            results=found,
            budget=results.budgets[0] if auto else str(budget),
            k=body.k,
            two_stage=body.two_stage,
            model=config.model_name,
            index_bytes_read=read,
            auto=schemas.AutoBudgetInfo.of(auto, results.escalations[0]) if auto else None,
            timings=schemas.Timings(
                encode_ms=(encoded_at - start) * 1000,
                score_ms=(done - encoded_at) * 1000,
                total_ms=(done - start) * 1000,
            ),
        )

    return router


def _search(store, queries, budget: Budget | AutoBudget, k: int, two_stage: bool):
    """The hits of the one query, and the index's results (an auto search's say what it cost)."""
    results = store.search(queries, budget, k, two_stage=two_stage)
    ids = results.ids[0] if results.ids else []
    scores = results.scores[0].tolist() if len(results.ids) else []
    metadata = results.metadata[0] if results.metadata else [None] * len(ids)
    hits = [
        schemas.SearchHit(id=str(item_id), score=float(score), metadata=meta or None)
        for item_id, score, meta in zip(ids, scores, metadata, strict=True)
        if math.isfinite(score)
    ]
    return hits, results
