"""ViDoRe (v2) at every budget: full-corpus page retrieval, nDCG@5 over graded qrels.

Data: the BEIR layout of the ``vidore/*`` hub datasets, split ``test``: ``corpus`` (``corpus-id``,
``image``), ``queries`` (``query-id``, ``query``, optional ``language``), ``qrels`` (``query-id``,
``corpus-id``, ``score``). Beyond ViDoRe, a corpus row may carry a ``text`` (with or without an image) and a
query row an ``image`` (with or without a ``query`` text), so text corpora and image queries — the
multi-aspect builders' tasks — run through the same protocol. A local dataset folder holds each of the
three as ``<name>.jsonl``, ``<name>.parquet`` or ``<name>/*.parquet`` (the hub layout); a jsonl ``image``
is a path relative to the folder, a parquet ``image`` is the hub's ``{bytes, path}`` struct.

Protocol: every page and query is encoded once with all vectors; each budget scores every query against
the whole corpus; metrics follow trec_eval (see :mod:`metaembed.eval.metrics`: linear graded gain, ties
by corpus id descending), averaged over queries that have qrels. The paper's seven v2 columns are
:data:`V2_TASKS`; an English task reads the ``*_eng_v2`` dataset, or the multilingual one filtered to
English queries when only that is present.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaembed.budget import Budget
from metaembed.data.records import ImageRoot, is_hub_id, iter_records, parquet_files
from metaembed.errors import DataError
from metaembed.eval.common import fingerprint, hub_revision
from metaembed.eval.metrics import evaluate_dense, mean_over_queries
from metaembed.eval.report import EvalResult
from metaembed.eval.runner import TaskFamily, TaskSummary, run, scoring_device
from metaembed.scoring import maxsim

MEASURES = ("ndcg_at_5", "ndcg_at_10", "recall_at_1", "recall_at_5", "mrr")
MAIN_METRIC = "ndcg_at_5"
PARTS = ("corpus", "queries", "qrels")
_LANGUAGES = {"en": "eng", "english": "eng", "fr": "fra", "french": "fra", "es": "spa", "spanish": "spa",
              "de": "deu", "german": "deu"}  # fmt: skip


@dataclass(frozen=True)
class VidoreTask:
    """One paper column: a dataset, optionally a fallback dataset, and a query-language filter."""

    name: str
    title: str
    dataset_id: str
    languages: tuple[str, ...] | None = None
    fallback_id: str | None = None

    @property
    def group(self) -> str:
        return "multilingual" if self.name.endswith("multilingual") else "english"


V2_TASKS: tuple[VidoreTask, ...] = (
    VidoreTask("esg_human", "ESG Restaurant Human", "vidore/esg_reports_human_labeled_v2"),
    VidoreTask("esg_synthetic", "ESG Restaurant Synthetic", "vidore/esg_reports_eng_v2", ("eng",),
               "vidore/esg_reports_v2"),
    VidoreTask("esg_synthetic_multilingual", "ESG Restaurant Synthetic Multilingual", "vidore/esg_reports_v2"),
    VidoreTask("biomedical", "MIT Biomedical", "vidore/biomedical_lectures_eng_v2", ("eng",),
               "vidore/biomedical_lectures_v2"),
    VidoreTask("biomedical_multilingual", "MIT Biomedical Multilingual", "vidore/biomedical_lectures_v2"),
    VidoreTask("economics", "Economics Macro", "vidore/economics_reports_eng_v2", ("eng",),
               "vidore/economics_reports_v2"),
    VidoreTask("economics_multilingual", "Economics Macro Multilingual", "vidore/economics_reports_v2"),
)  # fmt: skip
"""The paper's seven ViDoRe v2 columns (Table 2)."""


@dataclass
class BeirDataset:
    """A loaded task: corpus and query items (text and/or image refs: paths, encoded bytes or PIL), graded qrels."""

    name: str
    source: str
    revision: str | None
    corpus_ids: list[str]
    corpus_items: list[dict]  # {"text": str | None, "image": path, bytes, PIL image or None}
    query_ids: list[str]
    query_items: list[dict]
    qrels: dict[str, dict[str, int]]
    skipped_queries: int = 0


def normalise_language(value: Any) -> str:
    text = str(value).strip().lower().split("-")[0]
    return _LANGUAGES.get(text, text)


# ------------------------------------------------------------------------------------------- data
def _part_path(directory: Path, part: str) -> Path | None:
    for candidate in (directory / f"{part}.jsonl", directory / f"{part}.parquet", directory / part):
        if candidate.is_file() or (candidate.is_dir() and any(candidate.rglob("*.parquet"))):
            return candidate
    return None


def is_beir_dir(directory: Path) -> bool:
    return directory.is_dir() and all(_part_path(directory, part) is not None for part in PARTS)


def build_dataset(
    name: str,
    source: str,
    revision: str | None,
    corpus: Sequence[dict],
    queries: Sequence[dict],
    qrels: Sequence[dict],
    languages: Sequence[str] | None = None,
    image_root: Path | None = None,
    where: Mapping[str, Sequence[str]] | None = None,
) -> BeirDataset:
    """Validate the three BEIR tables and apply the language filter.

    ``where`` names each row of a part (``corpus``, ``queries``, ``qrels``) in error messages — ``file:line``
    or ``file row N`` as :func:`metaembed.data.records.iter_records` gives them; by default ``SOURCE PART row N``.
    """
    images = ImageRoot(image_root)
    at = _positions(source, where or {}, {"corpus": corpus, "queries": queries, "qrels": qrels})
    corpus_ids, corpus_items, first = [], [], {}
    for number, row in enumerate(corpus):
        if "corpus-id" not in row or not ({"image", "text"} & set(row)):
            raise DataError(f"{at['corpus'](number)}: needs 'corpus-id' and an 'image' or a 'text', has {sorted(row)}")
        page = str(row["corpus-id"])
        if page in first:
            raise DataError(
                f"{at['corpus'](number)}: corpus-id {page!r} repeats (first at {at['corpus'](first[page])}); "
                "each page needs a unique corpus-id"
            )
        first[page] = number
        corpus_ids.append(page)
        corpus_items.append(_item(row, "text", images, at["corpus"](number)))
    if not corpus_ids:
        raise DataError(f"{source}: the corpus is empty")
    wanted = {normalise_language(lang) for lang in languages} if languages else None
    query_ids, query_items, seen = [], [], set()
    for number, row in enumerate(queries):
        if "query-id" not in row or not ({"query", "image"} & set(row)):
            raise DataError(f"{at['queries'](number)}: needs 'query-id' and a 'query' or an 'image', has {sorted(row)}")
        if wanted is not None and normalise_language(row.get("language", "eng")) not in wanted:
            continue
        if str(row["query-id"]) in seen:
            raise DataError(f"{at['queries'](number)}: query-id {row['query-id']!r} repeats")
        seen.add(str(row["query-id"]))
        query_ids.append(str(row["query-id"]))
        query_items.append(_item(row, "query", images, at["queries"](number)))
    judged: dict[str, dict[str, int]] = {}
    known = set(corpus_ids)
    keep = set(query_ids)
    for number, row in enumerate(qrels):
        if not {"query-id", "corpus-id", "score"} <= set(row):
            raise DataError(f"{at['qrels'](number)}: needs 'query-id', 'corpus-id', 'score', has {sorted(row)}")
        query, doc = str(row["query-id"]), str(row["corpus-id"])
        if query not in keep:
            continue
        if doc not in known:
            raise DataError(f"{at['qrels'](number)}: corpus-id {doc!r} is not in the corpus")
        judged.setdefault(query, {})[doc] = _grade(row["score"], at["qrels"](number))
    have = [i for i, q in enumerate(query_ids) if q in judged]
    if not have:
        raise DataError(f"{source}: no query (after the language filter {sorted(wanted or [])}) has qrels")
    return BeirDataset(
        name=name,
        source=source,
        revision=revision,
        corpus_ids=corpus_ids,
        corpus_items=corpus_items,
        query_ids=[query_ids[i] for i in have],
        query_items=[query_items[i] for i in have],
        qrels=judged,
        skipped_queries=len(query_ids) - len(have),
    )


def _positions(
    source: str, where: Mapping[str, Sequence[str]], parts: Mapping[str, Sequence[dict]]
) -> dict[str, Callable[[int], str]]:
    """Per part, row number → the text that names that row in an error."""
    unknown = sorted(set(where) - set(parts))
    if unknown:
        raise DataError(f"where= names parts {unknown}; allowed: {sorted(parts)}")
    at = {}
    for part, rows in parts.items():
        if part in where:
            if len(where[part]) != len(rows):
                raise DataError(f"{source}: {len(where[part])} positions for {len(rows)} {part} rows")
            at[part] = where[part].__getitem__
        else:
            at[part] = functools.partial("{} {} row {}".format, source, part)
    return at


def _grade(value: Any, where: str) -> int:
    """A qrels score as an int: a whole number (``2``, ``2.0``, ``"2"``), never a silent truncation."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer():
        raise DataError(f"{where}: 'score' must be a whole number (a relevance grade), got {value!r}")
    return int(number)


def _item(row: dict, text_key: str, root: ImageRoot, where: str) -> dict:
    """A model item from a BEIR row: its text (``text_key``) and image, either of which may be absent."""
    text = row.get(text_key)
    image = row.get("image")
    return {
        "text": None if text is None else str(text),
        "image": None if image is None else _image_ref(image, root, where),
    }


def _image_ref(value: Any, root: ImageRoot, where: str) -> Any:
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, str) and value:
        return root.locate(value, where)
    if value is not None and hasattr(value, "convert"):  # a PIL image from datasets
        return value
    raise DataError(f"{where}: 'image' must be a path, a {{bytes, path}} struct or an image, got {value!r}")


def load_local(directory: Path, name: str, languages: Sequence[str] | None = None) -> BeirDataset:
    paths = {part: _part_path(directory, part) for part in PARTS}
    missing = [p for p, path in paths.items() if path is None]
    if missing:
        raise DataError(f"{directory} is not a BEIR dataset: no {missing} (<part>.jsonl, .parquet or folder)")
    files = sorted(f for path in paths.values() for f in ([path] if path.is_file() else parquet_files(path)))
    tables = {part: list(iter_records(paths[part])) for part in PARTS}
    rows = [[row for _, row in tables[part]] for part in PARTS]
    where = {part: [at for at, _ in tables[part]] for part in PARTS}
    return build_dataset(name, str(directory), fingerprint(files), *rows, languages, directory, where=where)


def load_hub(repo: str, name: str, languages: Sequence[str] | None = None) -> BeirDataset:
    from datasets import Image, load_dataset

    revision = hub_revision(repo)
    corpus = load_dataset(repo, "corpus", split="test", revision=revision).cast_column("image", Image(decode=False))
    queries = load_dataset(repo, "queries", split="test", revision=revision)
    qrels = load_dataset(repo, "qrels", split="test", revision=revision)
    return build_dataset(name, repo, revision, list(corpus), list(queries), list(qrels), languages)


def resolve_tasks(
    source: str | Path, tasks: Sequence[str] | None = None, languages: Sequence[str] | None = None
) -> list[BeirDataset]:
    """Load the tasks to run.

    * ``source`` is a BEIR folder or a hub id: that one dataset (filtered by ``languages``);
    * ``source`` is a folder of BEIR folders: the v2 tasks whose datasets are there (folder named like the
      hub id's last part), or the named ``tasks`` (v2 task names or folder names);
    * ``source`` is ``"hub"``: the v2 tasks (or the named ones) from the hub.
    """
    by_name = {t.name: t for t in V2_TASKS}
    if str(source) == "hub":
        chosen = [by_name[n] if n in by_name else _unknown(n, by_name) for n in (tasks or list(by_name))]
        return [_load_task_from_hub(task) for task in chosen]
    if is_hub_id(source):
        return [load_hub(str(source), str(source).split("/")[-1], languages)]
    directory = Path(source)
    if not directory.is_dir():
        raise DataError(f"ViDoRe data {str(source)!r} is not a folder, a hub id 'owner/name', or 'hub'")
    if is_beir_dir(directory):
        return [load_local(directory, directory.name, languages)]
    folders = {p.name: p for p in sorted(directory.iterdir()) if is_beir_dir(p)}
    if not folders:
        raise DataError(f"{directory} holds no BEIR datasets (folders with corpus, queries and qrels)")
    out = []
    if tasks:
        for name in tasks:
            if name in folders:
                out.append(load_local(folders[name], name, languages))
            elif name in by_name:
                found = _local_task(by_name[name], folders)
                if found is None:
                    raise DataError(
                        f"task {name!r}: neither {_base(by_name[name].dataset_id)!r} nor its "
                        f"fallback is among {sorted(folders)}"
                    )
                out.append(found)
            else:
                _unknown(name, by_name, folders)
        return out
    for task in V2_TASKS:
        found = _local_task(task, folders)
        if found is not None:
            out.append(found)
    if not out:  # no v2 datasets here: every folder is its own task
        out = [load_local(path, name, languages) for name, path in folders.items()]
    return out


def _base(dataset_id: str) -> str:
    return dataset_id.split("/")[-1]


def _local_task(task: VidoreTask, folders: dict[str, Path]) -> BeirDataset | None:
    if _base(task.dataset_id) in folders:
        return load_local(folders[_base(task.dataset_id)], task.name, task.languages)
    if task.fallback_id and _base(task.fallback_id) in folders:
        return load_local(folders[_base(task.fallback_id)], task.name, task.languages)
    return None


def _load_task_from_hub(task: VidoreTask) -> BeirDataset:
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return load_hub(task.dataset_id, task.name, task.languages)
    except DataError as error:
        if task.fallback_id is None or not isinstance(error.__cause__, RepositoryNotFoundError):
            raise
        return load_hub(task.fallback_id, task.name, task.languages)


def _unknown(name: str, by_name: dict, folders: dict | None = None):
    allowed = sorted(by_name) + sorted(folders or {})
    raise DataError(f"unknown ViDoRe task {name!r}; allowed: {allowed}")


# ---------------------------------------------------------------------------------------- scoring
class VidoreFamily(TaskFamily):
    """Every query against the whole corpus; trec_eval measures over graded qrels, means over queries."""

    benchmark = "vidore"
    main_metric = MAIN_METRIC
    measures = MEASURES
    encode_chunk = 256  # pages from parquet are encoded bytes: decode a chunk at a time

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device

    def items(self, task: BeirDataset) -> tuple[list[dict], list[dict]]:
        return task.query_items, task.corpus_items

    def score(self, task: BeirDataset, queries: torch.Tensor, pages: torch.Tensor, budgets: Sequence[Budget]) -> dict:
        device = self.device or pages.device
        pages, queries = pages.to(device), queries.to(device)
        values = {}
        for budget in budgets:
            scores = maxsim(queries, pages, budget).double().cpu().numpy()
            if np.isnan(scores).any():
                raise DataError(f"{task.name}: the encoder produced NaN scores")
            per_query = evaluate_dense(scores, task.query_ids, task.corpus_ids, task.qrels, MEASURES)
            values[str(budget)] = mean_over_queries(per_query, MEASURES)
        return {"values": values, "dim": int(pages.shape[2])}

    def summarize(self, task: BeirDataset, payload: dict, budgets: Sequence[Budget]) -> TaskSummary:
        known = {t.name: t for t in V2_TASKS}.get(task.name)
        described = dict(
            name=task.name, id=task.source, revision=task.revision,
            title=known.title if known else task.name, group=known.group if known else "other",
            languages=list(known.languages) if known and known.languages else None,
            num_queries=len(task.query_ids), num_candidates=len(task.corpus_ids),
            skipped_queries=task.skipped_queries,
        )  # fmt: skip
        n_queries, n_pages = len(task.query_ids), len(task.corpus_ids)
        encodes = {
            "query_encodes": n_queries,
            "candidate_encodes": n_pages,
            "naive_query_encodes": n_queries * len(budgets),
            "naive_candidate_encodes": n_pages * len(budgets),
        }
        return TaskSummary(payload["values"], int(payload["dim"]), described, encodes)

    def groups(self, described: Sequence[dict]) -> dict[str, list[str]]:
        membership = {"overall": [d["name"] for d in described]}
        for group in ("english", "multilingual"):
            members = [d["name"] for d in described if d["group"] == group]
            if members:
                membership[group] = members
        return membership


def evaluate_vidore(
    encoder: Any,
    datasets: Sequence[BeirDataset],
    budgets: Sequence[Budget | str] | None = None,
    *,
    batch_size: int = 8,
    model_name: str | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[str], None] | None = None,
    resume_dir: str | Path | None = None,
) -> EvalResult:
    """Run full-corpus retrieval on loaded tasks at every budget from one encoding pass per task.

    ``resume_dir``: finished tasks are saved there and reused by a rerun with the same model, budgets, data.
    """
    family = VidoreFamily(scoring_device(encoder, device))
    return run(family, encoder, datasets, budgets, batch_size=batch_size, model_name=model_name,
               progress=progress, resume_dir=resume_dir)  # fmt: skip
