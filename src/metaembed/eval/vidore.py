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

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaembed.budget import Budget
from metaembed.eval.common import (
    EvalDataError,
    ResumeStore,
    check_encoded,
    describe_model,
    fingerprint,
    hub_revision,
    is_hub_id,
    read_records,
    select_budgets,
)
from metaembed.eval.metrics import evaluate_dense, mean_over_queries
from metaembed.eval.report import EvalResult, mean
from metaembed.scoring import maxsim

MEASURES = ("ndcg@5", "ndcg@10", "recall@1", "recall@5", "mrr")
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
) -> BeirDataset:
    """Validate the three BEIR tables and apply the language filter."""
    corpus_ids, corpus_items = [], []
    for number, row in enumerate(corpus):
        if "corpus-id" not in row or not ({"image", "text"} & set(row)):
            raise EvalDataError(
                f"{source} corpus row {number}: needs 'corpus-id' and an 'image' or a 'text', has {sorted(row)}"
            )
        corpus_ids.append(str(row["corpus-id"]))
        corpus_items.append(_item(row, "text", image_root, f"{source} corpus row {number}"))
    if not corpus_ids:
        raise EvalDataError(f"{source}: the corpus is empty")
    if len(set(corpus_ids)) != len(corpus_ids):
        raise EvalDataError(f"{source}: corpus ids repeat; each page needs a unique corpus-id")
    wanted = {normalise_language(lang) for lang in languages} if languages else None
    query_ids, query_items, seen = [], [], set()
    for number, row in enumerate(queries):
        if "query-id" not in row or not ({"query", "image"} & set(row)):
            raise EvalDataError(
                f"{source} queries row {number}: needs 'query-id' and a 'query' or an 'image', has {sorted(row)}"
            )
        if wanted is not None and normalise_language(row.get("language", "eng")) not in wanted:
            continue
        if str(row["query-id"]) in seen:
            raise EvalDataError(f"{source} queries row {number}: query-id {row['query-id']!r} repeats")
        seen.add(str(row["query-id"]))
        query_ids.append(str(row["query-id"]))
        query_items.append(_item(row, "query", image_root, f"{source} queries row {number}"))
    judged: dict[str, dict[str, int]] = {}
    known = set(corpus_ids)
    keep = set(query_ids)
    for number, row in enumerate(qrels):
        if not {"query-id", "corpus-id", "score"} <= set(row):
            raise EvalDataError(f"{source} qrels row {number}: needs 'query-id', 'corpus-id', 'score'")
        query, doc = str(row["query-id"]), str(row["corpus-id"])
        if query not in keep:
            continue
        if doc not in known:
            raise EvalDataError(f"{source} qrels row {number}: corpus-id {doc!r} is not in the corpus")
        judged.setdefault(query, {})[doc] = int(row["score"])
    have = [i for i, q in enumerate(query_ids) if q in judged]
    if not have:
        raise EvalDataError(f"{source}: no query (after the language filter {sorted(wanted or [])}) has qrels")
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


def _item(row: dict, text_key: str, root: Path | None, where: str) -> dict:
    """A model item from a BEIR row: its text (``text_key``) and image, either of which may be absent."""
    text = row.get(text_key)
    image = row.get("image")
    return {
        "text": None if text is None else str(text),
        "image": None if image is None else _image_ref(image, root, where),
    }


def _image_ref(value: Any, root: Path | None, where: str) -> Any:
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, str) and value:
        path = Path(value)
        if not path.is_absolute() and root is not None:
            path = root / path
        if not path.is_file():
            raise EvalDataError(f"{where}: image {str(path)!r} does not exist")
        return path
    if value is not None and hasattr(value, "convert"):  # a PIL image from datasets
        return value
    raise EvalDataError(f"{where}: 'image' must be a path, a {{bytes, path}} struct or an image, got {value!r}")


def load_local(directory: Path, name: str, languages: Sequence[str] | None = None) -> BeirDataset:
    paths = {part: _part_path(directory, part) for part in PARTS}
    missing = [p for p, path in paths.items() if path is None]
    if missing:
        raise EvalDataError(f"{directory} is not a BEIR dataset: no {missing} (<part>.jsonl, .parquet or folder)")
    files = sorted(f for path in paths.values() for f in ([path] if path.is_file() else path.rglob("*.parquet")))
    return build_dataset(
        name, str(directory), fingerprint(files), *(read_records(paths[p]) for p in PARTS), languages, directory
    )


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
        raise EvalDataError(f"ViDoRe data {str(source)!r} is not a folder, a hub id 'owner/name', or 'hub'")
    if is_beir_dir(directory):
        return [load_local(directory, directory.name, languages)]
    folders = {p.name: p for p in sorted(directory.iterdir()) if is_beir_dir(p)}
    if not folders:
        raise EvalDataError(f"{directory} holds no BEIR datasets (folders with corpus, queries and qrels)")
    out = []
    if tasks:
        for name in tasks:
            if name in folders:
                out.append(load_local(folders[name], name, languages))
            elif name in by_name:
                found = _local_task(by_name[name], folders)
                if found is None:
                    raise EvalDataError(
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
    except EvalDataError as error:
        if task.fallback_id is None or not isinstance(error.__cause__, RepositoryNotFoundError):
            raise
        return load_hub(task.fallback_id, task.name, task.languages)


def _unknown(name: str, by_name: dict, folders: dict | None = None):
    allowed = sorted(by_name) + sorted(folders or {})
    raise EvalDataError(f"unknown ViDoRe task {name!r}; allowed: {allowed}")


# ---------------------------------------------------------------------------------------- scoring
def _open(ref: Any) -> Any:
    if ref is None:
        return None
    if isinstance(ref, bytes):
        from PIL import Image

        with Image.open(io.BytesIO(ref)) as image:
            image.load()
            return image.copy()
    return ref


def encode_items(encode: Callable, items: Sequence[dict], batch_size: int, chunk: int = 256) -> torch.Tensor:
    """Encode items once, ``chunk`` at a time, so encoded image bytes are decoded only when needed."""
    parts = []
    for start in range(0, len(items), chunk):
        batch = [{"text": i["text"], "image": _open(i["image"])} for i in items[start : start + chunk]]
        parts.append(encode(batch, batch_size=batch_size))
    return torch.cat(parts)


def score_task(
    encoder: Any,
    dataset: BeirDataset,
    budgets: Sequence[Budget],
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, dict[str, float]], int]:
    """Mean measures per budget (``{budget: {metric: value}}``) and the embedding dimension."""
    if progress:
        progress(f"{dataset.name}: encoding {len(dataset.corpus_ids)} pages and {len(dataset.query_ids)} queries once")
    pages = encode_items(encoder.encode_candidates, dataset.corpus_items, batch_size)
    pages = check_encoded(pages, len(dataset.corpus_ids), "candidate", budgets)
    queries = encode_items(encoder.encode_queries, dataset.query_items, batch_size)
    queries = check_encoded(queries, len(dataset.query_ids), "query", budgets)
    if queries.shape[2] != pages.shape[2]:
        raise EvalDataError(f"query vectors have D = {queries.shape[2]} but page vectors D = {pages.shape[2]}")
    if device is None:
        device = getattr(encoder, "device", None)
        device = device if isinstance(device, torch.device) else pages.device
    pages, queries = pages.to(device), queries.to(device)
    out = {}
    for budget in budgets:
        scores = maxsim(queries, pages, budget).double().cpu().numpy()
        if np.isnan(scores).any():
            raise EvalDataError(f"{dataset.name}: the encoder produced NaN scores")
        per_query = evaluate_dense(scores, dataset.query_ids, dataset.corpus_ids, dataset.qrels, MEASURES)
        means = mean_over_queries(per_query, MEASURES)
        out[str(budget)] = {name.replace("@", "_at_"): value for name, value in means.items()}
    return out, int(pages.shape[2])


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
    chosen = select_budgets(encoder, budgets)
    model_info = describe_model(encoder, model_name)
    store = ResumeStore(resume_dir, "vidore", model_info, [str(b) for b in chosen]) if resume_dir else None
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise EvalDataError(f"task names repeat: {names}")
    by_name = {t.name: t for t in V2_TASKS}
    per_task, scores, described, dim = {}, [], [], 0
    encodes = {"query_encodes": 0, "candidate_encodes": 0, "naive_query_encodes": 0, "naive_candidate_encodes": 0}
    for dataset in datasets:
        stored = store.load(dataset.name, dataset.source, dataset.revision) if store else None
        if stored is not None:
            values, dim = stored["values"], stored["dim"]
            if progress:
                progress(f"{dataset.name}: reusing the stored result from {store.directory}")
        else:
            values, dim = score_task(encoder, dataset, chosen, batch_size=batch_size, device=device, progress=progress)
            if store:
                store.save(dataset.name, dataset.source, dataset.revision, {"values": values, "dim": dim})
        per_task[dataset.name] = values
        for budget, metrics in values.items():
            for metric, value in metrics.items():
                scores.append(dict(task=dataset.name, budget=budget, metric=metric, value=value))
        task = by_name.get(dataset.name)
        described.append(dict(
            name=dataset.name, id=dataset.source, revision=dataset.revision,
            title=task.title if task else dataset.name, group=task.group if task else "other",
            languages=list(task.languages) if task and task.languages else None,
            num_queries=len(dataset.query_ids), num_candidates=len(dataset.corpus_ids),
            skipped_queries=dataset.skipped_queries,
        ))  # fmt: skip
        encodes["query_encodes"] += len(dataset.query_ids)
        encodes["candidate_encodes"] += len(dataset.corpus_ids)
        encodes["naive_query_encodes"] += len(dataset.query_ids) * len(chosen)
        encodes["naive_candidate_encodes"] += len(dataset.corpus_ids) * len(chosen)
    budget_names = [str(b) for b in chosen]
    membership = {"overall": list(per_task)}
    for group in ("english", "multilingual"):
        members = [d["name"] for d in described if d["group"] == group]
        if members:
            membership[group] = members
    groups = [
        dict(group=group, budget=budget, metric=metric.replace("@", "_at_"),
             value=mean([per_task[m][budget][metric.replace("@", "_at_")] for m in members]),
             num_tasks=len(members))
        for group, members in membership.items()
        for budget in budget_names
        for metric in MEASURES
    ]  # fmt: skip
    return EvalResult(
        benchmark="vidore",
        model=model_info,
        main_metric=MAIN_METRIC,
        budgets=budget_names,
        embedding_dim=dim,
        datasets=described,
        scores=scores,
        groups=groups,
        encodes=encodes,
    )
