"""Training data: readers for the MMEB-train / mmE5, ColPali and plain-JSONL schemas, a weighted mixture.

A record becomes an :class:`Example` (a query, its positive, its own hard negatives), each side an item
``{"text": str | None, "image": PIL image | None}``. Sources:

* a ``.jsonl`` file, or a directory of them (sorted), read lazily by byte offset;
* a ``.parquet`` file or a directory of them (sorted; every file), read a row group at a time by
  :class:`metaembed.data.records.ParquetRows`, the parquet reader evaluation uses too;
* a ``.json`` file, a ``datasets.save_to_disk`` directory, or a hub id (``owner/name``, with ``subset`` and
  ``split``) — through ``datasets``.

Records and images are read by :mod:`metaembed.data.records`, the reader evaluation and the builders use
too: image paths are resolved against the dataset's ``image_root`` (a directory, or a ``.zip`` extracted
once into the cache; default: the directory holding the data file). Images stored in the records (PIL,
``{"bytes": …}``) are used as they are.

Schemas (``format``; ``auto`` picks by the first record's keys):

* ``mmeb`` (MMEB-train, mmE5 hard negatives, MoCa): ``qry``, ``qry_image_path``, ``pos_text``,
  ``pos_image_path``, ``neg_text``, ``neg_image_path`` (str or list; "" means none);
* ``colpali`` (``vidore/colpali_train_set``): ``query`` (text), ``image`` (the positive page);
* ``jsonl``: ``query``, ``query_image``, ``positive``, ``positive_image``, ``negative`` /
  ``negative_image`` (str or list) or ``negatives`` (a list of ``{"text", "image"}``).

A bad record (invalid JSON, missing field, no content, unreadable image) is skipped with a counted warning
naming ``dataset:row``, its ``file:line`` and the reason, or stops the run (``on_bad_record="fail"``) with
the same message.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metaembed.data.records import ImageRoot, JsonlRows, ParquetRows, check_on_bad_record, is_hub_id
from metaembed.errors import DataError, InputError, RecordError
from metaembed.model.items import load_image

log = logging.getLogger("metaembed.train")

FORMATS = ("auto", "mmeb", "colpali", "jsonl")
_MAX_BAD_IN_A_ROW = 1000


@dataclass
class DatasetSpec:
    """One sub-dataset of the training mixture.

    Attributes:
        path: a data file, a directory, or a hub id ``owner/name``.
        name: label used in logs and bad-record warnings (default: the file or hub name).
        format: ``auto`` | ``mmeb`` | ``colpali`` | ``jsonl``.
        image_root: directory or ``.zip`` that relative image paths are resolved against.
        weight: sampling weight; a draw picks this dataset with probability weight / Σ weights.
        max_rows: use only the first ``max_rows`` rows (the reference caps big subsets at 50k-100k).
        subset, split: hub config name and split for ``datasets.load_dataset``.
    """

    path: str
    name: str | None = None
    format: str = "auto"
    image_root: str | None = None
    weight: float = 1.0
    max_rows: int | None = None
    subset: str | None = None
    split: str = "train"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataError(f"dataset {self.path!r}: format must be one of {FORMATS}, got {self.format!r}")
        if not self.weight > 0:
            raise DataError(f"dataset {self.path!r}: weight must be > 0, got {self.weight}")
        if self.max_rows is not None and self.max_rows < 1:
            raise DataError(f"dataset {self.path!r}: max_rows must be ≥ 1, got {self.max_rows}")
        if self.name is None:
            path = Path(str(self.path).rstrip("/"))
            generic = path.stem in ("train", "training", "data", "")
            self.name = f"{path.parent.name}/{path.stem}" if generic and path.parent.name else path.stem or str(path)


@dataclass
class Example:
    """A training triple; every side is an item dict ``{"text", "image"}`` (images loaded)."""

    query: dict
    positive: dict
    negatives: list[dict] = field(default_factory=list)
    where: str = ""


# ---------------------------------------------------------------------------------------------- sources
def _open_rows(spec: DatasetSpec):
    """Rows with ``len`` and integer indexing, and the default image root."""
    path = Path(spec.path).expanduser()
    if path.is_file():
        if path.suffix == ".jsonl":
            return JsonlRows([path]), path.parent
        if path.suffix == ".parquet":
            return ParquetRows([path]), path.parent
        if path.suffix == ".json":
            from datasets import load_dataset

            return load_dataset("json", data_files=str(path), split="train"), path.parent
        raise DataError(f"dataset {spec.name}: cannot read {path} (expected .jsonl, .json or .parquet)")
    if path.is_dir():
        jsonl = sorted(path.glob("*.jsonl"))
        if jsonl:
            return JsonlRows(jsonl), path
        parquet = sorted(path.rglob("*.parquet"))
        if parquet:
            return ParquetRows(parquet), path
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            from datasets import load_from_disk

            data = load_from_disk(str(path))
            return (data[spec.split] if hasattr(data, "keys") else data), path
        raise DataError(f"dataset {spec.name}: {path} holds no .jsonl, .parquet or saved dataset")
    text = str(spec.path)
    if is_hub_id(text):
        try:
            from datasets import load_dataset

            return load_dataset(text, spec.subset, split=spec.split), None
        except Exception as error:  # offline, unknown repo, bad subset: datasets raises many types
            raise DataError(f"dataset {spec.name}: cannot load hub dataset {text!r}: {error}") from error
    raise DataError(f"dataset {spec.name}: {text!r} is neither a file, a directory nor a hub id 'owner/name'")


# ---------------------------------------------------------------------------------------------- schemas
def detect_format(row: Mapping) -> str:
    if "qry" in row:
        return "mmeb"
    if "query" in row and "image" in row and "positive" not in row:
        return "colpali"
    if "query" in row and ("positive" in row or "positive_image" in row):
        return "jsonl"
    raise RecordError(
        f"cannot tell the schema from keys {sorted(row)}: expected mmeb (qry, pos_text, …), "
        "colpali (query, image) or jsonl (query, positive, …)"
    )


def _listify(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


class _Reader:
    """One sub-dataset: rows + schema + image root → Examples (or a RecordError naming the row)."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.rows, default_root = _open_rows(spec)
        self.images = ImageRoot(Path(spec.image_root).expanduser() if spec.image_root else default_root)
        self.size = len(self.rows) if spec.max_rows is None else min(len(self.rows), spec.max_rows)
        if self.size == 0:
            raise DataError(f"dataset {spec.name}: {spec.path} has no rows")
        self.format = spec.format
        self._where = ""

    def where(self, i: int) -> str:
        """``file:line`` of a JSONL row, ``file row N`` of a parquet row, else the source and row number."""
        return self.rows.where(i) if isinstance(self.rows, JsonlRows | ParquetRows) else f"{self.spec.path} row {i}"

    def _bad(self, reason: str) -> RecordError:
        return RecordError(f"{self._where}: {reason}")

    def example(self, i: int) -> Example:
        self._where = self.where(i)
        row = self.rows[i]
        if not isinstance(row, Mapping):
            raise self._bad(f"a record must be a mapping, got {type(row).__name__}")
        try:
            fmt = self.format if self.format != "auto" else detect_format(row)
        except RecordError as error:
            raise self._bad(str(error)) from None
        if fmt == "mmeb":
            query = self._item(row, "qry", "qry_image_path", inline="qry_image")
            positive = self._item(row, "pos_text", "pos_image_path", inline="pos_image")
            negatives = self._pairs(row.get("neg_text"), row.get("neg_image_path"))
        elif fmt == "colpali":
            query = self._item(row, "query", None)
            positive = self._item(row, None, "image")
            negatives = []
        else:
            query = self._item(row, "query", "query_image", required=False)
            positive = self._item(row, "positive", "positive_image", required=False)
            if "negatives" in row:
                negatives = [self._side(n.get("text"), n.get("image")) for n in _listify(row["negatives"])]
            else:
                negatives = self._pairs(row.get("negative"), row.get("negative_image"))
        return Example(query, positive, negatives, where=f"{self.spec.name}:{i}")

    def _item(
        self, row: Mapping, text_key: str | None, image_key: str | None, inline: str | None = None, required=True
    ) -> dict:
        for key in (text_key, image_key) if required else ():
            if key is not None and key not in row and not (inline and inline in row):
                raise self._bad(f"missing field {key!r}")
        image = row.get(inline) if inline and row.get(inline) is not None else None
        if image is None and image_key is not None:
            image = row.get(image_key)
        return self._side(row.get(text_key) if text_key else None, image)

    def _pairs(self, texts, images) -> list[dict]:
        texts, images = _listify(texts), _listify(images)
        count = max(len(texts), len(images))
        if texts and images and len(texts) != len(images):
            raise self._bad(f"{len(texts)} negative texts but {len(images)} negative images")
        return [
            self._side(texts[j] if j < len(texts) else None, images[j] if j < len(images) else None)
            for j in range(count)
        ]

    def _side(self, text, image) -> dict:
        if text is not None and not isinstance(text, str):
            raise self._bad(f"text must be a string, got {type(text).__name__}")
        text = text if text else None
        loaded = None
        if image not in (None, ""):
            try:  # RGB, and the shapes the model's processor accepts
                loaded = load_image(self.images.open(image, self._where), self._where)
            except InputError as error:
                raise RecordError(str(error)) from error
        if text is None and loaded is None:
            raise self._bad("a query, positive or negative has neither text nor image")
        return {"text": text, "image": loaded}


# ---------------------------------------------------------------------------------------------- mixture
class Mixture:
    """Weighted interleaving of sub-datasets as a resumable stream of Examples.

    Draw t picks dataset d with probability w_d / Σw (a generator seeded by ``(seed, rank, t)``, so the
    stream is a pure function of the position) and takes d's next row from a per-epoch permutation.
    ``state_dict`` / ``load_state_dict`` hold the position and per-dataset counters: a resumed run
    reads exactly the examples an uninterrupted one would.
    """

    def __init__(
        self,
        specs: Sequence[DatasetSpec],
        *,
        seed: int = 0,
        rank: int = 0,
        on_bad_record: str = "skip",
    ) -> None:
        if not specs:
            raise DataError("the recipe names no datasets (data.datasets is empty)")
        check_on_bad_record(on_bad_record)
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise DataError(f"dataset names must be unique, got {names} (set 'name' per dataset)")
        self.readers = [_Reader(spec) for spec in specs]
        weights = np.array([spec.weight for spec in specs], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.seed, self.rank, self.on_bad_record = seed, rank, on_bad_record
        self.position = 0
        self.drawn = [0] * len(self.readers)
        self.bad = Counter()

    def __len__(self) -> int:
        return sum(reader.size for reader in self.readers)

    def state_dict(self) -> dict:
        return {"position": self.position, "drawn": list(self.drawn), "bad": dict(self.bad)}

    def load_state_dict(self, state: Mapping) -> None:
        if len(state["drawn"]) != len(self.readers):
            raise DataError(f"saved data state has {len(state['drawn'])} datasets, the recipe {len(self.readers)}")
        self.position, self.drawn, self.bad = int(state["position"]), list(state["drawn"]), Counter(state["bad"])

    def _row(self, d: int) -> int:
        reader, count = self.readers[d], self.drawn[d]
        epoch, offset = divmod(count, reader.size)
        order = np.random.default_rng([self.seed, self.rank, d, epoch]).permutation(reader.size)
        self.drawn[d] += 1
        return int(order[offset])

    def next_batch(self, size: int, by_dataset: bool = False) -> list[Example]:
        """``size`` examples; ``by_dataset``: all from one dataset drawn by weight (no cross-task shortcut
        inside a batch, e.g. telling text from image candidates), else each example drawn on its own."""
        if not by_dataset:
            return [self.next_example() for _ in range(size)]
        rng = np.random.default_rng([self.seed, self.rank, 1 << 21, self.position])
        d = int(rng.choice(len(self.readers), p=self.probabilities))
        return [self.next_example(dataset=d) for _ in range(size)]

    def next_example(self, dataset: int | None = None) -> Example:
        for _ in range(_MAX_BAD_IN_A_ROW):
            rng = np.random.default_rng([self.seed, self.rank, 1 << 20, self.position])
            d = int(rng.choice(len(self.readers), p=self.probabilities)) if dataset is None else dataset
            self.position += 1
            i = self._row(d)
            try:
                return self.readers[d].example(i)
            except RecordError as error:
                message = f"bad record {self.readers[d].spec.name}:{i} at {error}"
                if self.on_bad_record == "fail":
                    raise DataError(message + " (set data.on_bad_record=skip to skip bad records)") from None
                self.bad[self.readers[d].spec.name] += 1
                log.warning("skipping %s [%d bad so far]", message, sum(self.bad.values()))
        raise DataError(f"{_MAX_BAD_IN_A_ROW} bad records in a row; is a dataset or its image_root wrong?")

    def __iter__(self) -> Iterator[Example]:
        while True:
            yield self.next_example()


# ---------------------------------------------------------------------------------------------- collate
def collate(model, examples: Sequence[Example], num_negatives: int, chunk_size: int | None = None) -> dict:
    """Processed model inputs for a batch: query chunks, candidate chunks (positives, then negatives).

    Each example contributes up to ``num_negatives`` of its own negatives; a missing one is filled with
    its positive and masked out of the loss (``negative_mask``), so shapes stay fixed. With no negative
    in the whole batch, ``num_negatives`` becomes 0.
    """
    k = num_negatives if any(example.negatives for example in examples) else 0
    queries = [example.query for example in examples]
    candidates = [example.positive for example in examples]
    mask = []
    for example in examples:
        own = example.negatives[:k]
        mask.append([True] * len(own) + [False] * (k - len(own)))
        candidates.extend(own + [example.positive] * (k - len(own)))
    size = chunk_size or max(len(queries), len(candidates))
    batch = {
        "query": [model.processor(queries[i : i + size], "query") for i in range(0, len(queries), size)],
        "candidate": [model.processor(candidates[i : i + size], "candidate") for i in range(0, len(candidates), size)],
        "num_negatives": k,
    }
    if k and not all(all(row) for row in mask):
        import torch

        batch["negative_mask"] = torch.tensor(mask, dtype=torch.bool)
    return batch
