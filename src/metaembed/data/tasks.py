"""Retrieval tasks composed by the multi-aspect builders, written in the three schemas the other rooms read.

A task is test queries with one gold candidate each, the test candidates, and training triples (query,
positive, hard negative). :func:`task_files` writes it as

* ``eval/<task>.jsonl`` — MMEB-eval: each query with its gold first and ``distractors`` others from the
  test candidates (``metaembed eval mmeb --data <dataset folder>``);
* ``beir/<task>/{corpus,queries,qrels}.jsonl`` — BEIR: the whole test corpus, nDCG over qrels
  (``metaembed eval vidore --data <dataset folder>/beir``); image paths relative to the task folder; a
  corpus row's ``parts`` lists what the candidate is composed of;
* ``train/<task>.jsonl`` — MMEB-train: ``qry, qry_image_path, pos_text, pos_image_path, neg_text,
  neg_image_path`` (``metaembed train``);
* ``dev/<task>.jsonl`` — MMEB-eval over a dev split carved from the training sources (never trained on):
  choose between trained models there, never on the test split.

Image paths inside an item are relative to the dataset folder, as in the single-aspect builders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metaembed.data.common import distractors, jsonl_bytes
from metaembed.errors import DataError


@dataclass(frozen=True)
class Entry:
    """One side of a pair: a text (``""`` for none) and an image path relative to the dataset folder.

    ``parts``: what a multi-aspect candidate is made of (a page's tile ids, a section's member texts); written
    to the BEIR corpus for inspection and for scorers that encode parts separately, never to the model.
    """

    text: str
    image: str = ""
    parts: tuple[str, ...] = ()


@dataclass
class Task:
    """Test queries (each with the index of its gold candidate), test candidates, training triples."""

    name: str
    query_ids: list[str]
    queries: list[Entry]
    gold: list[int]
    corpus_ids: list[str]
    corpus: list[Entry]
    train: list[tuple[Entry, Entry, Entry]] = field(default_factory=list)

    def check(self) -> None:
        if not (len(self.query_ids) == len(self.queries) == len(self.gold)):
            raise DataError(f"{self.name}: query ids, queries and gold differ in length")
        if len(self.corpus_ids) != len(self.corpus) or len(set(self.corpus_ids)) != len(self.corpus_ids):
            raise DataError(f"{self.name}: corpus ids must be unique, one per candidate")
        if len(set(self.query_ids)) != len(self.query_ids):
            raise DataError(f"{self.name}: query ids repeat")
        if any(not 0 <= g < len(self.corpus) for g in self.gold):
            raise DataError(f"{self.name}: a gold index is outside the corpus")


def task_files(task: Task, num_distractors: int, seed: str, split: str = "test") -> tuple[dict[str, bytes], int]:
    """The task's files and the distractor count used (``num_distractors``, or fewer for a small corpus).

    Each query's distractors come from ``random.Random(sha256('<seed>:<task>:<query id>'))``. ``split="dev"``
    writes only ``dev/<task>.jsonl`` (MMEB-eval over the dev candidates, for choosing between trained models
    without looking at the test split).
    """
    task.check()
    count = min(num_distractors, len(task.corpus) - 1)
    if count < 1:
        raise DataError(
            f"{task.name}: {len(task.corpus)} {split} candidates are too few for a retrieval task; "
            "build from more source items"
        )
    records = []
    for query_id, query, gold in zip(task.query_ids, task.queries, task.gold, strict=True):
        order = [gold, *distractors(len(task.corpus), gold, count, (seed, task.name, query_id))]
        records.append(
            {
                "qry_text": query.text,
                "qry_img_path": query.image,
                "tgt_text": [task.corpus[i].text for i in order],
                "tgt_img_path": [task.corpus[i].image for i in order],
            }
        )
    if split == "dev":
        return {f"dev/{task.name}.jsonl": jsonl_bytes(records)}, count
    up = "../../"  # beir/<task>/ → the dataset folder
    files = {
        f"eval/{task.name}.jsonl": jsonl_bytes(records),
        f"beir/{task.name}/corpus.jsonl": jsonl_bytes(
            _beir_row("corpus-id", cid, "text", entry, up)
            for cid, entry in zip(task.corpus_ids, task.corpus, strict=True)
        ),
        f"beir/{task.name}/queries.jsonl": jsonl_bytes(
            _beir_row("query-id", qid, "query", entry, up)
            for qid, entry in zip(task.query_ids, task.queries, strict=True)
        ),
        f"beir/{task.name}/qrels.jsonl": jsonl_bytes(
            {"query-id": qid, "corpus-id": task.corpus_ids[g], "score": 1}
            for qid, g in zip(task.query_ids, task.gold, strict=True)
        ),
    }
    if task.train:
        files[f"train/{task.name}.jsonl"] = jsonl_bytes(
            {
                "qry": query.text,
                "qry_image_path": query.image,
                "pos_text": positive.text,
                "pos_image_path": positive.image,
                "neg_text": negative.text,
                "neg_image_path": negative.image,
            }
            for query, positive, negative in task.train
        )
    return files, count


def _beir_row(id_key: str, item_id: str, text_key: str, entry: Entry, up: str) -> dict:
    row: dict = {id_key: item_id}
    if entry.text:
        row[text_key] = entry.text
    if entry.image:
        row["image"] = up + entry.image
    if entry.parts:
        row["parts"] = list(entry.parts)
    return row
