"""Build a dataset folder from raw sources: images, MMEB train / eval JSONL, manifest. Deterministic, atomic."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from metaembed.data import emoji, openclipart
from metaembed.data.common import (
    I2T_QUERY,
    IMAGE_CANDIDATE,
    MARGIN,
    MAX_SOURCE_PIXELS,
    T2I_QUERY,
    ImageProblem,
    SourceItem,
    distractors,
    hard_negatives,
    hash_int,
    is_test,
    jsonl_bytes,
    render_image,
    split_rule,
    write_atomically,
)
from metaembed.data.errors import FETCH_HINT, ImageSkippedWarning, MissingRawDataError
from metaembed.errors import DataError

SOURCES: dict[str, ModuleType] = {"openclipart": openclipart, "emoji": emoji}
FORMAT_VERSION = 1
TASKS = ("t2i", "i2t")


@dataclass(frozen=True)
class BuildOptions:
    """How a dataset is built. The defaults are what ``metaembed data build`` uses."""

    size: int = 128  # output images are size × size PNG (RGB, white background)
    test_percent: int = 20  # share of items whose key hashes into the test split
    num_distractors: int = 100  # eval candidates per query besides the gold
    limit: int | None = None  # keep this many items, taken in order of a hash of their key: a deterministic subset

    def validate(self) -> None:
        if not 16 <= self.size <= 1024:
            raise DataError(f"image size must be between 16 and 1024 px, got {self.size}")
        if not 1 <= self.test_percent <= 99:
            raise DataError(f"test percent must be between 1 and 99, got {self.test_percent}")
        if self.num_distractors < 1:
            raise DataError(f"the number of distractors must be at least 1, got {self.num_distractors}")
        if self.limit is not None and self.limit < 2:
            raise DataError(f"limit must be at least 2 items (or unset), got {self.limit}")


def build_dataset(
    source: str,
    raw: str | Path = "data/raw",
    out: str | Path = "data",
    options: BuildOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Build ``<out>/<source>/`` from ``raw`` and return its manifest.

    The folder is written next to the target and renamed into place at the end, so a failure leaves any
    previous build untouched. Unreadable source images are skipped (an :class:`ImageSkippedWarning` names
    each one) and listed in the manifest.
    """
    options = options or BuildOptions()
    options.validate()
    if source not in SOURCES:
        raise DataError(f"unknown dataset {source!r}; available: {', '.join(sorted(SOURCES))}")
    module = SOURCES[source]
    raw, out = Path(raw), Path(out)
    say = progress or (lambda message: None)
    if not raw.is_dir():
        raise MissingRawDataError(f"raw data folder {raw} does not exist; {FETCH_HINT}")

    say(f"{source}: reading and cleaning texts from {raw}")
    items, raw_count, dropped = module.read_items(raw)
    if options.limit is not None:  # a deterministic subset: items in order of a hash of their key
        items = sorted(items, key=lambda item: (hash_int(f"{source}:subset:{item.key}"), item.key))

    say(f"{source}: rendering {min(len(items), options.limit or len(items))} images at {options.size}x{options.size}")
    rendered: dict[str, bytes] = {}
    skipped: list[dict[str, str]] = []
    seen_images: set[str] = set()
    kept: list[SourceItem] = []
    for position, item in enumerate(items):
        if options.limit is not None and len(kept) == options.limit:
            dropped["over_limit"] += len(items) - position
            break
        try:
            png = render_image(item.image, options.size)
        except ImageProblem as problem:
            where = _relative(item.image, raw)
            warnings.warn(f"{source}: skipped image {where}: {problem}", ImageSkippedWarning, stacklevel=2)
            skipped.append({"key": item.key, "path": where, "reason": str(problem)})
            continue
        digest = hashlib.sha256(png).hexdigest()
        if digest in seen_images:
            dropped["duplicate_image"] += 1
            continue
        seen_images.add(digest)
        rendered[item.id] = png
        kept.append(item)
    kept.sort(key=lambda item: item.key)
    if len({item.id for item in kept}) != len(kept):
        raise DataError(f"{source}: two items map to the same image id; rename the raw files")

    train = [item for item in kept if not is_test(source, item.key, options.test_percent)]
    test = [item for item in kept if is_test(source, item.key, options.test_percent)]
    if len(train) < 2:
        raise DataError(f"{source}: only {len(train)} training items after cleaning; need at least 2")
    if len(test) < options.num_distractors + 1:
        raise DataError(
            f"{source}: {len(test)} test items cannot give each query {options.num_distractors} distractors; "
            f"lower --distractors (at most {max(len(test) - 1, 0)}) or raise --test-percent"
        )

    say(f"{source}: {len(train)} train / {len(test)} test items; mining hard negatives and sampling distractors")
    files: dict[str, bytes] = {f"images/{item.id}.png": rendered[item.id] for item in kept}
    files.update(_train_files(source, train, module.CONTAINED_TITLES_ARE_DUPLICATES))
    files.update(_eval_files(source, test, options.num_distractors))
    files["items.jsonl"] = jsonl_bytes(
        {
            "id": item.id,
            "key": item.key,
            "split": "test" if item in test_set else "train",
            "title": item.title,
            "keywords": list(item.keywords),
            "description": item.description,
            "category": item.category,
            "caption": item.caption,
            "image": f"images/{item.id}.png",
        }
        for test_set in [set(test)]
        for item in kept
    )

    from PIL import __version__ as pillow_version

    manifest = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "source_versions": module.source_versions(raw),
        "licenses": module.LICENSES,
        "image": {
            "size": options.size,
            "format": "PNG",
            "mode": "RGB",
            "background": "white",
            "fit": "RGBA composited on white, white margin trimmed, aspect kept, centred with a "
            f"{MARGIN:.0%} border, LANCZOS",
            "max_source_pixels": MAX_SOURCE_PIXELS,
        },
        "split": {"rule": split_rule(source, options.test_percent), "test_percent": options.test_percent},
        "eval": {
            "distractors_per_query": options.num_distractors,
            "candidates": "gold first, then distractors sampled from the test split with "
            f"random.Random(sha256('{source}:<task>:<key>'))",
        },
        "train": {
            "hard_negative": "the other training item with the highest Jaccard overlap of title words "
            "and keywords (ties: smaller key)"
            + (
                "; items whose title words contain the other's are skipped as the same thing drawn twice"
                if module.CONTAINED_TITLES_ARE_DUPLICATES
                else ""
            )
        },
        "instructions": {"t2i_query": T2I_QUERY, "image_candidate": IMAGE_CANDIDATE, "i2t_query": I2T_QUERY},
        "limit": options.limit,
        "counts": {
            "raw_entries": raw_count,
            "dropped": dict(sorted(dropped.items())),
            "skipped_images": len(skipped),
            "items": len(kept),
            "train_items": len(train),
            "test_items": len(test),
            "records": {name: data.count(b"\n") for name, data in sorted(files.items()) if name.endswith(".jsonl")},
        },
        "skipped_images": skipped,
        "tools": {"pillow": pillow_version},
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    files["manifest.json"] = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    write_atomically(out / source, files)
    say(f"{source}: wrote {len(files)} files to {out / source}")
    return manifest


def _train_files(source: str, train: list[SourceItem], skip_contained_titles: bool) -> dict[str, bytes]:
    negatives = hard_negatives(train, source, skip_contained_titles)
    t2i, i2t = [], []
    for item, neg in ((item, train[n]) for item, n in zip(train, negatives, strict=True)):
        t2i.append(
            {
                "qry": T2I_QUERY.format(caption=item.caption),
                "qry_image_path": "",
                "pos_text": IMAGE_CANDIDATE,
                "pos_image_path": f"images/{item.id}.png",
                "neg_text": IMAGE_CANDIDATE,
                "neg_image_path": f"images/{neg.id}.png",
            }
        )
        i2t.append(
            {
                "qry": I2T_QUERY,
                "qry_image_path": f"images/{item.id}.png",
                "pos_text": item.caption,
                "pos_image_path": "",
                "neg_text": neg.caption,
                "neg_image_path": "",
            }
        )
    return {f"train/{source}_t2i.jsonl": jsonl_bytes(t2i), f"train/{source}_i2t.jsonl": jsonl_bytes(i2t)}


def _eval_files(source: str, test: list[SourceItem], count: int) -> dict[str, bytes]:
    out = {}
    for task in TASKS:
        records = []
        for index, item in enumerate(test):
            order = [index, *distractors(len(test), index, count, (source, task, item.key))]
            if task == "t2i":
                record = {
                    "qry_text": T2I_QUERY.format(caption=item.caption),
                    "qry_img_path": "",
                    "tgt_text": [IMAGE_CANDIDATE] * len(order),
                    "tgt_img_path": [f"images/{test[i].id}.png" for i in order],
                }
            else:
                record = {
                    "qry_text": I2T_QUERY,
                    "qry_img_path": f"images/{item.id}.png",
                    "tgt_text": [test[i].caption for i in order],
                    "tgt_img_path": [""] * len(order),
                }
            records.append(record)
        out[f"eval/{source}_{task}.jsonl"] = jsonl_bytes(records)
    return out


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def verify_dataset(folder: str | Path) -> dict:
    """Check every file listed in ``<folder>/manifest.json`` against its sha256; return the manifest."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise MissingRawDataError(f"{path} is missing: {folder} is not a built dataset (run `metaembed data build`)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    bad = []
    for name, digest in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != digest:
            bad.append(name)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{folder}: {len(bad)} files are missing or differ from the manifest: {shown}; rebuild")
    extra = Counter(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) - Counter(
        [*manifest["files"], "manifest.json"]
    )
    if extra:
        raise DataError(f"{folder}: files not in the manifest: {', '.join(sorted(extra)[:5])}; rebuild")
    return manifest
