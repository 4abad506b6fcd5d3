"""``metaembed search INDEX "a red bicycle" [--image q.png] --model M [--budget 4x8] [-k 10]``: text or image in,
a ranked table out, with what the search cost.

:func:`search` is the same in Python: encode one query with the model, search the index at the budget, and
time both. The encode time does not depend on the budget; the scoring time and the bytes read do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from metaembed.budget import Budget
from metaembed.errors import InputError


@dataclass
class Hit:
    rank: int
    id: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Found:
    """One query's results and what they cost."""

    query: str
    budget: str
    k: int
    two_stage: bool
    results: list[Hit]
    encode_ms: float
    score_ms: float
    index_bytes_read: int
    index_size: int
    quality: dict[str, float] = field(default_factory=dict)  # the model card's numbers at this budget
    escalations: int | None = None  # budget "auto": rescorings above the cheap budget (None: a fixed budget)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["encode_ms"], out["score_ms"] = round(self.encode_ms, 3), round(self.score_ms, 3)
        return out


def query_item(text: str | None, image: str | os.PathLike[str] | None) -> tuple[Any, str]:
    """The model input for a text and/or image query, and the label that names it in the output."""
    if text is not None and not text.strip():
        raise InputError("the query text is empty; give some words, or --image FILE")
    if image is None:
        if text is None:
            raise InputError("give a query: words to search for, or --image FILE")
        return text, text
    path = Path(image)
    if not path.is_file():
        raise InputError(f"query image {path} does not exist")
    if text is None:
        return path, path.name
    return {"text": text, "image": path}, f"{text} + {path.name}"


def search(
    index: Any,
    model: Any,
    query: Any,
    budget: Budget | str | int | None = None,
    k: int = 10,
    *,
    two_stage: bool = False,
    candidates: int | None = None,
    label: str | None = None,
    quality: dict[str, dict[str, float]] | None = None,
    model_dir: str | os.PathLike[str] | None = None,
) -> Found:
    """Encode ``query`` (text, image path, PIL image or ``{"text", "image"}``) and search ``index`` at ``budget``.

    ``budget`` defaults to the full one the model and index allow; ``"auto"`` (or an AutoBudget) is the
    calibrated per-query budget stored beside the index, else in ``model_dir``, and the result names the budget
    the query ended at. ``quality`` (the model card's table, see :func:`metaembed.model.card.read_quality`) is
    copied into the result for that budget.
    """
    from metaembed.auto_budget import is_auto
    from metaembed.index.adaptive import resolve_policy
    from metaembed.index.cost import search_bytes

    if (index.dim, index.num_vectors) != (model.embedding_dim, model.num_vectors("candidate")):
        raise InputError(
            f"the index holds {index.num_vectors} vectors of dimension {index.dim}, but the model makes "
            f"{model.num_vectors('candidate')} of dimension {model.embedding_dim}: search with the model that built it"
        )
    n_query = model.num_vectors("query")
    auto = resolve_policy(index, budget, model_dir).validate(n_query, index.num_vectors) if is_auto(budget) else None
    if auto is not None:
        budget = auto.ceiling  # encode every query vector the policy may use
    budget = Budget(n_query, index.num_vectors) if budget is None else Budget.parse(budget)
    budget.validate(n_query, index.num_vectors)
    start = time.perf_counter()
    queries = model.encode_queries([query], show_progress_bar=False)[:, : budget.r_q]
    encoded = time.perf_counter()
    results = index.search(queries, auto or budget, k, two_stage=two_stage, candidates=candidates)
    done = time.perf_counter()
    if auto is not None:
        budget, read = Budget.parse(results.budgets[0]), results.bytes_read[0]
    else:
        read = search_bytes(index, budget, two_stage=two_stage, candidates=candidates, k=k)
    hits = [
        Hit(rank, item_id, round(float(score), 6), meta or {})
        for rank, (item_id, score, meta) in enumerate(
            zip(results.ids[0], results.scores[0].tolist(), results.metadata[0], strict=True), 1
        )
    ]
    return Found(
        query=label if label is not None else str(query),
        budget=str(budget),
        k=k,
        two_stage=two_stage,
        results=hits,
        encode_ms=(encoded - start) * 1000,
        score_ms=(done - encoded) * 1000,
        index_bytes_read=read,
        index_size=len(index),
        quality=(quality or {}).get(str(budget), {}),
        escalations=results.escalations[0] if auto is not None else None,
    )


def describe(metadata: dict[str, Any], width: int = 72) -> str:
    """A result's caption, else its file path (relative to here when it is below), cut to ``width``."""
    text = metadata.get("caption") or metadata.get("title") or ""
    if not text and metadata.get("path"):
        path = Path(metadata["path"])
        text = str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render(found: Found) -> str:
    lines = [
        f"{found.query!r} at budget {found.budget}{' (two-stage)' if found.two_stage else ''}"
        f"{'' if found.escalations is None else f' (auto, {found.escalations} escalation(s))'}: "
        f"top {len(found.results)} of {found.index_size:,} items",
        f"encode {found.encode_ms:.1f} ms · scoring {found.score_ms:.1f} ms · "
        f"read {found.index_bytes_read:,} B ({found.index_bytes_read / 2**20:.2f} MiB) of candidate vectors",
    ]
    if found.quality:
        shown = (f"{name} {100 * v:.1f} %" if 0 <= v <= 1 else f"{name} {v:.4g}" for name, v in found.quality.items())
        lines.append("model card at this budget: " + ", ".join(shown))
    width = max([len("id"), *(len(hit.id) for hit in found.results)])
    lines += ["", f"{'rank':>4}  {'score':>8}  {'id':<{width}}  caption / path"]
    lines += [f"{h.rank:>4}  {h.score:8.4f}  {h.id:<{width}}  {describe(h.metadata)}" for h in found.results]
    return "\n".join(lines)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "search",
        help="search an index with text or an image: ranked results, encode/scoring time, bytes read",
        description="Encode a text and/or image query with the model that built the index and print the top k "
        "at a budget, with the encode and scoring time and the bytes of candidate vectors the budget read.",
    )
    parser.add_argument("index", help="index directory (built with `metaembed index build ... --items`)")
    parser.add_argument("query", nargs="?", help="words to search for (with --image: text that goes with it)")
    parser.add_argument("--image", help="an image file as the query")
    parser.add_argument("--model", required=True, help="checkpoint directory: the model that built the index")
    parser.add_argument(
        "--budget",
        help="r_q x r_c, e.g. 4x8, N for NxN, or auto (the calibrated per-query budget stored with the index or "
        "model) (default: all vectors)",
    )
    parser.add_argument("-k", type=int, default=10, help="results (default 10)")
    parser.add_argument("--two-stage", action="store_true", help="ANN on the (1,1) vectors, then exact rerank")
    parser.add_argument("--candidates", type=int, help="coarse candidates for --two-stage (default max(10k, 100))")
    parser.add_argument("--url", help="Qdrant server URL (qdrant backend)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import transformers

    from metaembed.index.cli import open_for_cli
    from metaembed.model import MetaEmbedModel
    from metaembed.model.card import read_quality

    query, label = query_item(args.query, args.image)
    if args.k < 1:
        raise InputError(f"-k must be at least 1, got {args.k}")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with open_for_cli(args.index, url=args.url, read_only=True) as index:
        model = MetaEmbedModel.from_pretrained(args.model).eval()
        found = search(
            index, model, query, args.budget, args.k, two_stage=args.two_stage, candidates=args.candidates,
            label=label, quality=read_quality(args.model), model_dir=args.model,
        )  # fmt: skip
    if args.json:
        json.dump(found.as_dict(), sys.stdout, ensure_ascii=False)
        print()
    else:
        print(render(found))
    return 0
