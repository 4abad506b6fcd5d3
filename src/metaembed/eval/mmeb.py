"""MMEB (VLM2Vec's 36 datasets) at every budget: Precision@1 of each query over its own candidate list.

Data: the ``TIGER-Lab/MMEB-eval`` schema, one record per query — ``qry_text``, ``qry_img_path``,
``tgt_text`` (list), ``tgt_img_path`` (list), the gold candidate first. A source is a local folder with
``<dataset>.jsonl`` or ``<dataset>/*.parquet`` per dataset (the hub layout), or a hub id. Image paths are
relative to an image root: ``--image-root``, else an ``images.zip`` in the folder (extracted once into
the cache), else the folder itself.

Protocol, and where it deliberately differs from a naive reading:

* each query is ranked only among its own candidates;
* a candidate is the pair (text, image path); one repeated within a list counts once (the official
  BEIR repackaging keeps one corpus id per distinct item), so a repeat of the gold *is* the gold;
* **ties never favour the gold**: the gold's rank is 1 + the number of other candidates scoring
  greater than **or equal to** it (VLM2Vec's ``argmax`` would give index 0, the gold, every tie);
* every distinct query and candidate of a dataset is encoded **once**, with all vectors; every budget is
  scored from that pass: one similarity block per query from the scoring engine, sliced per budget;
* overall, category and IND / OOD scores are plain means over datasets; a dataset outside the 36 is
  reported in category "Other" (split "n/a") and counts in the overall only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from metaembed.budget import Budget
from metaembed.data.records import ImageRoot, is_hub_id, iter_records, parquet_files
from metaembed.errors import DataError
from metaembed.eval.common import fingerprint, hub_revision
from metaembed.eval.report import EvalResult
from metaembed.eval.runner import TaskFamily, TaskSummary, encode_items, run, scoring_device
from metaembed.scoring import maxsim_from_similarities, token_similarities

CATEGORIES = ("Classification", "VQA", "Retrieval", "Visual Grounding")
OTHER = "Other"
MMEB_HUB_ID = "TIGER-Lab/MMEB-eval"
MEASURES = ("precision_at_1", "hit_at_5", "mrr")
MAIN_METRIC = "precision_at_1"

_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Classification": (
        ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"),
        ("Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"),
    ),
    "VQA": (
        ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W"),
        ("ScienceQA", "VizWiz", "GQA", "TextVQA"),
    ),
    "Retrieval": (
        ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA"),
        ("FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"),
    ),
    "Visual Grounding": (("MSCOCO",), ("Visual7W-Pointing", "RefCOCO", "RefCOCO-Matching")),
}
MMEB_DATASETS: dict[str, tuple[str, str]] = {
    name: (category, split)
    for category, (ind, ood) in _GROUPS.items()
    for split, names in (("IND", ind), ("OOD", ood))
    for name in names
}
"""The 36 datasets: name → (category, "IND" | "OOD")."""

ItemKey = tuple[str | None, str | None]  # (text, image path relative to the image root)


@dataclass
class MMEBDataset:
    """One dataset's queries, each with its own candidate keys (gold first, repeats removed)."""

    name: str
    source: str
    revision: str | None
    image_root: Path | None
    queries: list[ItemKey]
    candidates: list[list[ItemKey]]

    @property
    def category(self) -> str:
        return MMEB_DATASETS.get(self.name, (OTHER, "n/a"))[0]

    @property
    def split(self) -> str:
        return MMEB_DATASETS.get(self.name, (OTHER, "n/a"))[1]


@dataclass
class DatasetScores:
    """Per-query gold ranks at each budget, the metrics derived from them, and the encode counts."""

    name: str
    ranks: dict[str, list[int]]
    num_queries: int
    distinct_queries: int
    distinct_candidates: int
    candidate_slots: int
    dim: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- data
def parse_records(
    rows: Sequence[dict], where: str, places: Sequence[str] | None = None
) -> tuple[list[ItemKey], list[list[ItemKey]]]:
    """Query keys and per-query candidate keys (gold first, duplicates dropped) from MMEB records.

    ``places``: where each row came from (``file:line``) for error messages, else ``<where> record <n>``.
    """
    queries, candidates = [], []
    for number, row in enumerate(rows):
        at = places[number] if places is not None else f"{where} record {number}"
        for key in ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path"):
            if key not in row:
                raise DataError(
                    f"{at}: missing field {key!r} (MMEB-eval records have qry_text, "
                    "qry_img_path, tgt_text [list], tgt_img_path [list])"
                )
        queries.append(_key(row["qry_text"], row["qry_img_path"], at + " query"))
        texts, images = _as_list(row["tgt_text"], at, "tgt_text"), _as_list(row["tgt_img_path"], at, "tgt_img_path")
        if not texts and not images:
            raise DataError(f"{at}: empty candidate list; the gold candidate must come first")
        if texts and images and len(texts) != len(images):
            raise DataError(
                f"{at}: tgt_text has {len(texts)} entries but tgt_img_path {len(images)}; "
                "they must pair up (use empty strings for a missing side)"
            )
        count = max(len(texts), len(images))
        texts, images = texts or [None] * count, images or [None] * count
        keys = [_key(t, i, f"{at} candidate {j}") for j, (t, i) in enumerate(zip(texts, images, strict=True))]
        candidates.append(list(dict.fromkeys(keys)))
    return queries, candidates


def _as_list(value: Any, at: str, field_name: str) -> list:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise DataError(f"{at}: {field_name} must be a list, got {type(value).__name__}")
    return list(value)


def _key(text: Any, image: Any, at: str) -> ItemKey:
    for name, value in (("text", text), ("image path", image)):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{at}: {name} must be a string or null, got {type(value).__name__}")
    text = text if text and text.strip() else None
    image = image if image and image.strip() else None
    if text is None and image is None:
        raise DataError(f"{at}: has neither text nor an image path")
    return text, image


def list_local_datasets(directory: Path) -> list[str]:
    """Dataset names in a folder: ``<name>.jsonl`` files and sub-folders with parquet files directly inside."""
    names = {p.stem for p in directory.glob("*.jsonl")}
    names |= {p.name for p in directory.iterdir() if p.is_dir() and any(p.glob("*.parquet"))}
    return sorted(names)


def load_datasets(
    source: str | Path, names: Sequence[str] | None = None, image_root: str | Path | None = None
) -> list[MMEBDataset]:
    """Read datasets from a local folder or a hub id (all found ones when ``names`` is None).

    A folder without datasets but with an ``eval/`` sub-folder that has them is a data builder's source
    folder (``data/<source>/eval/<task>.jsonl``): its datasets are read, with images relative to the folder.
    """
    if is_hub_id(source):
        return _load_hub(str(source), names, image_root)
    directory = Path(source)
    if not directory.is_dir():
        raise DataError(f"MMEB data {str(source)!r} is neither a folder nor a hub id 'owner/name'")
    available = list_local_datasets(directory)
    if (directory / "eval").is_dir() and (not available or (directory / "manifest.json").is_file()):
        # a data builder's source folder: data/<source>/eval/<task>.jsonl, image paths relative to data/<source>/
        image_root = directory if image_root is None else image_root
        directory = directory / "eval"
        available = list_local_datasets(directory)
    wanted = list(names) if names else available
    missing = [n for n in wanted if n not in available]
    if missing:
        raise DataError(
            f"{directory}: no data for {missing}; available: {available or 'none'} "
            "(expected <dataset>.jsonl or <dataset>/*.parquet)"
        )
    if not wanted:
        raise DataError(f"{directory} holds no MMEB datasets (<dataset>.jsonl or <dataset>/*.parquet)")
    root = _image_root(directory, image_root)
    out = []
    for name in wanted:
        path = directory / f"{name}.jsonl"
        path = path if path.is_file() else directory / name
        files = [path] if path.is_file() else parquet_files(path)  # the files iter_records reads
        records = list(iter_records(path))
        queries, candidates = parse_records([r for _, r in records], f"{path}", [w for w, _ in records])
        out.append(MMEBDataset(name, str(path), fingerprint(files), root.folder, queries, candidates))
    _resolve_images(out, root)
    return out


def _image_root(directory: Path, image_root: str | Path | None) -> ImageRoot:
    """``--image-root`` (a folder or a .zip), else an ``images.zip`` in the folder, else the folder itself."""
    if image_root is not None:
        return ImageRoot(image_root)
    archive = directory / "images.zip"
    return ImageRoot(archive if archive.is_file() else directory)


def _resolve_images(datasets: Sequence[MMEBDataset], root: ImageRoot) -> None:
    """Pick each dataset's image folder (an archive may wrap images in a top folder); fail early on missing files."""
    for dataset in datasets:
        paths = sorted({k[1] for k in dataset.queries if k[1]} | {k[1] for c in dataset.candidates for k in c if k[1]})
        if not paths:
            continue
        dataset.image_root = root.folder_for(paths)
        absent = [p for p in paths if not (dataset.image_root / p).is_file()]
        if absent:
            raise DataError(
                f"{dataset.name}: {len(absent)} of {len(paths)} images are missing under "
                f"{dataset.image_root}, e.g. {absent[:3]}; pass --image-root"
            )


def _load_hub(repo: str, names: Sequence[str] | None, image_root: str | Path | None) -> list[MMEBDataset]:
    from datasets import load_dataset
    from huggingface_hub import hf_hub_download

    wanted = list(names) if names else list(MMEB_DATASETS)
    revision = hub_revision(repo)
    if image_root is not None:
        root = ImageRoot(image_root)
    else:
        root = ImageRoot(hf_hub_download(repo, "images.zip", repo_type="dataset", revision=revision))
    out = []
    for name in wanted:
        rows = load_dataset(repo, name, split="test", revision=revision)
        queries, candidates = parse_records(list(rows), f"{repo}/{name}")
        out.append(MMEBDataset(name, f"{repo}/{name}", revision, root.folder, queries, candidates))
    _resolve_images(out, root)
    return out


# ---------------------------------------------------------------------------------------- scoring
def model_items(keys: Sequence[ItemKey], root: Path | None) -> list[dict]:
    """Encoder inputs ({"text", "image"} dicts, image paths resolved under ``root``) for item keys."""
    return [{"text": t, "image": (root / i) if (i and root is not None) else i} for t, i in keys]


def encode_keys(
    encoder: Any, keys: Sequence[ItemKey], root: Path | None, side: str, budgets: Sequence[Budget], batch_size: int
) -> torch.Tensor:
    """Embeddings ``(len(keys), R, D)`` of item keys on one side, checked against the budgets."""
    encode = encoder.encode_queries if side == "query" else encoder.encode_candidates
    return encode_items(encode, model_items(keys, root), side, budgets, batch_size)


def budget_scores(query: torch.Tensor, candidates: torch.Tensor, budgets: Sequence[Budget]) -> torch.Tensor:
    """``(n_budgets, N)`` MaxSim scores of one query ``(R_q, D)`` against ``(N, R_c, D)`` at every budget.

    One similarity block ``(N, R_q, R_c)`` from the scoring engine, sliced per budget.
    """
    sims = token_similarities(query[None], candidates)[0]
    return torch.stack([maxsim_from_similarities(sims, budget) for budget in budgets])


def metrics_from_ranks(ranks: Sequence[int]) -> dict[str, float]:
    """Precision@1 (= hit@1), hit@5 and MRR from gold ranks (1 = first)."""
    if not ranks:
        raise DataError("no queries to score")
    n = len(ranks)
    return {
        "precision_at_1": sum(r == 1 for r in ranks) / n,
        "hit_at_5": sum(r <= 5 for r in ranks) / n,
        "mrr": sum(1.0 / r for r in ranks) / n,
    }


class MMEBFamily(TaskFamily):
    """Each query ranked among its own distinct candidates; every distinct query and candidate encoded once."""

    benchmark = "mmeb"
    main_metric = MAIN_METRIC
    measures = MEASURES
    noun = "dataset"

    def __init__(self, device: torch.device | None = None, store_dtype: torch.dtype = torch.float32) -> None:
        self.device, self.store_dtype = device, store_dtype

    def items(self, task: MMEBDataset) -> tuple[list[dict], list[dict]]:
        queries = list(dict.fromkeys(task.queries))
        candidates = list(dict.fromkeys(k for c in task.candidates for k in c))
        return model_items(queries, task.image_root), model_items(candidates, task.image_root)

    def score(self, task: MMEBDataset, q: torch.Tensor, c: torch.Tensor, budgets: Sequence[Budget]) -> dict:
        query_index = {k: i for i, k in enumerate(dict.fromkeys(task.queries))}
        candidate_index = {k: i for i, k in enumerate(dict.fromkeys(k for c in task.candidates for k in c))}
        device = self.device or q.device
        q, c = q.to(device, torch.float32), c.to(device, self.store_dtype)  # bf16 storage halves memory; fp32 scores
        ranks: dict[str, list[int]] = {str(b): [] for b in budgets}
        for key, keys in zip(task.queries, task.candidates, strict=True):
            index = torch.tensor([candidate_index[k] for k in keys], device=device)
            scores = budget_scores(q[query_index[key]], c.index_select(0, index).float(), budgets)  # gold: column 0
            if torch.isnan(scores).any():
                raise DataError(f"{task.name}: the encoder produced NaN scores")
            gold_rank = (scores >= scores[:, :1]).sum(dim=1).tolist()  # a tie with the gold ranks above it
            for budget, rank in zip(budgets, gold_rank, strict=True):
                ranks[str(budget)].append(int(rank))
        result = DatasetScores(
            name=task.name,
            ranks=ranks,
            num_queries=len(task.queries),
            distinct_queries=len(query_index),
            distinct_candidates=len(candidate_index),
            candidate_slots=sum(len(c) for c in task.candidates),
            dim=int(q.shape[2]),
        )
        result.metrics = {budget: metrics_from_ranks(r) for budget, r in ranks.items()}
        return asdict(result)

    def summarize(self, task: MMEBDataset, payload: dict, budgets: Sequence[Budget]) -> TaskSummary:
        result = DatasetScores(**payload)
        described = dict(
            name=task.name,
            id=task.source,
            revision=task.revision,
            category=task.category,
            split=task.split,
            num_queries=result.num_queries,
            num_candidates=result.distinct_candidates,
        )
        encodes = {
            "query_encodes": result.distinct_queries,
            "candidate_encodes": result.distinct_candidates,
            "naive_query_encodes": result.num_queries * len(budgets),
            "naive_candidate_encodes": result.candidate_slots * len(budgets),
        }
        return TaskSummary(result.metrics, result.dim, described, encodes)

    def groups(self, described: Sequence[dict]) -> dict[str, list[str]]:
        """Overall, category and IND / OOD means (plain means over the datasets present)."""
        names = [d["name"] for d in described]
        membership: dict[str, list[str]] = {"overall": names}
        for category in (*CATEGORIES, OTHER):
            members = [n for n in names if MMEB_DATASETS.get(n, (OTHER, ""))[0] == category]
            if members:
                membership[category] = members
        for split in ("IND", "OOD"):
            members = [n for n in names if MMEB_DATASETS.get(n, ("", "n/a"))[1] == split]
            if members:
                membership[split] = members
        return membership


def evaluate_mmeb(
    encoder: Any,
    datasets: Sequence[MMEBDataset],
    budgets: Sequence[Budget | str] | None = None,
    *,
    batch_size: int = 8,
    model_name: str | None = None,
    device: torch.device | str | None = None,
    store_dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
    resume_dir: str | Path | None = None,
) -> EvalResult:
    """Run the MMEB protocol on loaded datasets; one encoding pass per dataset, every budget scored.

    With ``resume_dir`` each finished dataset is saved there and a rerun with the same model, budgets and
    data reuses it (see :class:`~metaembed.eval.common.ResumeStore`).
    """
    family = MMEBFamily(scoring_device(encoder, device), store_dtype)
    return run(family, encoder, datasets, budgets, batch_size=batch_size, model_name=model_name,
               progress=progress, resume_dir=resume_dir)  # fmt: skip
