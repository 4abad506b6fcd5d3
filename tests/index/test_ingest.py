"""Files → index: what is stored, bad items, resuming after kill -9, and torchrun shards equal to one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from metaembed.cli import main
from metaembed.errors import InputError
from metaembed.index import create_index, open_index
from metaembed.index import ingestion as ingest_module
from metaembed.index.files import discover, load
from metaembed.index.ingestion import IngestError, ingest, shard_name

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from metaembed import MetaEmbedModel

    torch.set_num_threads(1)  # 2-thread OpenMP stalls on a loaded 2-core machine; results do not depend on it
    return MetaEmbedModel.from_pretrained(tiny_checkpoint).eval()


def make_items(root: Path, n_text: int = 6) -> Path:
    """Images (some with a sidecar caption), text files, and three bad items."""
    root.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(COLOURS[:4]):
        Image.new("RGB", (24 + 4 * i, 24), colour).save(root / f"{colour}.png")
        if i % 2 == 0:
            (root / f"{colour}.txt").write_text(f"a {colour} square")
    for i in range(n_text):
        (root / "docs").mkdir(exist_ok=True)
        (root / "docs" / f"note-{i:03d}.md").write_text(f"note {i}: the {COLOURS[i % 8]} report, page {i}")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "empty.txt").write_text("")
    (root / "notes.bin").write_bytes(b"\x00")
    return root


def expected_ids(root: Path) -> list[str]:
    return [i.id for i in discover([root]).items if i.id not in ("broken.png", "empty.txt")]


def test_ingest_stores_every_good_item_with_metadata_and_lists_the_bad_ones(tmp_path, model):
    items = make_items(tmp_path / "items")
    report = ingest(tmp_path / "ix", model, items, dtype="fp32", batch_size=3, chunk_size=4, progress=False)
    ids = expected_ids(items)
    assert (report.listed, report.added, report.already, report.index_size) == (len(ids) + 2, len(ids), 0, len(ids))
    assert {b.id: b.reason for b in report.bad} == {
        "broken.png": "not a readable image (unknown format or corrupt header)",
        "empty.txt": "empty text",
    }
    assert report.ignored == {".bin": 1} and report.items_per_s > 0
    with open_index(tmp_path / "ix", read_only=True) as index:
        assert index.ids() == ids  # listing order
        stored, meta = index.get(["red.png", "green.png", "docs/note-001.md"])
    assert meta[0]["caption"] == "a red square" and meta[0]["kind"] == "image+text" and meta[0]["width"] == 24
    assert "caption" not in meta[1] and meta[1]["kind"] == "image"
    assert meta[2]["caption"] == "note 1: the green report, page 1" and meta[2]["size"] > 0
    by_id = {i.id: i for i in discover([items]).items}
    alone = model.encode_candidates([load(by_id[i])[0] for i in ["red.png", "green.png", "docs/note-001.md"]])
    torch.testing.assert_close(stored, alone, rtol=0, atol=1e-5)  # batched with other items, same vectors


def test_a_rerun_adds_only_what_is_new(tmp_path, model):
    items = make_items(tmp_path / "items")
    ingest(tmp_path / "ix", model, items, progress=False)
    again = ingest(tmp_path / "ix", model, items, progress=False)
    assert (again.added, again.already, again.encoded) == (0, len(expected_ids(items)), 2)  # only the bad retried
    (items / "docs" / "late.txt").write_text("added later")
    later = ingest(tmp_path / "ix", model, items, progress=False)
    assert later.added == 1 and later.index_size == len(expected_ids(items))
    with pytest.raises(InputError, match="stores bf16, not int8"):
        ingest(tmp_path / "ix", model, items, dtype="int8", progress=False)


def test_strict_stops_before_the_chunk_with_a_bad_item(tmp_path, model):
    items = make_items(tmp_path / "items")
    listed = [i.id for i in discover([items]).items]
    with pytest.raises(IngestError, match=r"(?s)1 bad item\(s\) and strict is on.*broken.png"):
        ingest(tmp_path / "ix", model, items, strict=True, chunk_size=2, progress=False)
    with open_index(tmp_path / "ix", read_only=True) as index:
        assert index.ids() == listed[: listed.index("broken.png") // 2 * 2]  # the chunks before it, whole


def test_an_item_the_model_refuses_is_listed_and_its_batch_still_indexed(tmp_path, model):
    class Picky:
        embedding_dim, num_vectors = model.embedding_dim, model.num_vectors

        def encode_candidates(self, values, **kwargs):
            if any(v["text"] and "poison" in v["text"] for v in values):
                raise InputError("item 0: text is poison")
            return model.encode_candidates(values, **kwargs)

    (tmp_path / "items").mkdir()
    for name in ("a", "b", "poison", "d"):
        (tmp_path / "items" / f"{name}.txt").write_text(f"{name} text")
    report = ingest(tmp_path / "ix", Picky(), tmp_path / "items", batch_size=4, progress=False)
    assert report.added == 3 and [(b.id, b.reason) for b in report.bad] == [
        ("poison.txt", "the model refused it: item 0: text is poison")
    ]


def test_an_index_for_another_model_is_refused(tmp_path, model):
    create_index(tmp_path / "ix", dim=8, num_vectors=64).close()
    with pytest.raises(InputError, match=r"dimension 8.*new index for this model"):
        ingest(tmp_path / "ix", model, make_items(tmp_path / "items"), progress=False)


def test_cli_build_add_and_report(tmp_path, tiny_checkpoint, capsys):
    items = make_items(tmp_path / "items")
    ix, report = tmp_path / "ix", tmp_path / "report.json"
    assert main(["index", "add", str(ix), "--model", str(tiny_checkpoint), "--items", str(items)]) == 2
    assert f"create it with `metaembed index build {ix} --model MODEL --items FOLDER`" in capsys.readouterr().err
    args = ["--model", str(tiny_checkpoint), "--items", str(items), "--quiet", "--torch-threads", "1"]
    assert main(["index", "build", str(ix), *args, "--where", "kind=none"]) == 0
    assert "added 0 items" in capsys.readouterr().out  # --where matched nothing
    assert main(["index", "build", str(ix), *args, "--report", str(report), "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert "added 4 items" in out and "broken.png: not a readable image" in out
    assert main(["index", "add", str(ix), *args]) == 0
    assert f"holds {len(expected_ids(items))}" in capsys.readouterr().out
    assert json.loads(report.read_text())["bad"][0]["id"] == "broken.png"
    assert main(["index", "build", str(ix), "--items", str(items)]) == 2
    assert "--items needs --model" in capsys.readouterr().err
    assert main(["index", "build", str(ix), "--items", str(items), "--model", str(tiny_checkpoint), "--ids", "i"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["index", "build", str(tmp_path / "other")]) == 2
    assert "give --model and --items" in capsys.readouterr().err


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONFAULTHANDLER": "1"}


def _build(index: Path, checkpoint: Path, items: Path, *extra: str, procs: int = 1) -> list[str]:
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(procs)]  # fmt: skip
    command = [*launcher, "-m", "metaembed.cli", "index", "build", str(index), "--model", str(checkpoint)]
    return [*command, "--items", str(items), "--dtype", "fp32", "--torch-threads", "1", *extra]


def test_a_build_killed_half_way_finishes_on_rerun_without_duplicates_or_loss(tmp_path, tiny_checkpoint, model):
    items = make_items(tmp_path / "items", n_text=160)
    index = tmp_path / "ix"
    command = _build(index, tiny_checkpoint, items, "--chunk-size", "8", "--batch-size", "4", "--quiet")
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, committed = time.monotonic() + 120, 0
    while time.monotonic() < deadline and process.poll() is None:
        if (index / "MANIFEST").exists():
            with open_index(index, read_only=True) as reader:
                committed = len(reader)
            if committed >= 16:
                break
        time.sleep(0.05)
    assert process.poll() is None, "the build finished before it could be killed; give it more items"
    process.send_signal(signal.SIGKILL)
    process.wait()
    with open_index(index, read_only=True) as reader:
        assert 16 <= len(reader) < len(expected_ids(items))
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "were already in the index" in done.stdout
    ids = expected_ids(items)
    with open_index(index, read_only=True) as reader:
        assert sorted(reader.ids()) == sorted(ids) and len(reader) == len(ids)
        stored, _ = reader.get(ids[-8:])
    by_id = {i.id: i for i in discover([items]).items}
    fresh = model.encode_candidates([load(by_id[i])[0] for i in ids[-8:]], batch_size=4)
    torch.testing.assert_close(stored, fresh, rtol=0, atol=1e-5)


def test_two_torchrun_processes_build_the_index_one_process_builds(tmp_path, tiny_checkpoint):
    items = make_items(tmp_path / "items", n_text=9)
    extra = ("--chunk-size", "3", "--batch-size", "2", "--quiet")
    one = subprocess.run(_build(tmp_path / "one", tiny_checkpoint, items, *extra), env=_env(), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_build(tmp_path / "two", tiny_checkpoint, items, *extra, procs=2), env=_env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "bad item" in two.stdout and not (tmp_path / "two.shards").exists()  # committed, shards removed
    with open_index(tmp_path / "one", read_only=True) as a, open_index(tmp_path / "two", read_only=True) as b:
        assert a.ids() == b.ids() == expected_ids(items)
        va, ma = a.get(a.ids())
        vb, mb = b.get(b.ids())
    assert ma == mb
    assert torch.equal(va, vb)  # fp32: bit for bit


def test_shards_an_interrupted_torchrun_left_are_committed_not_encoded_again(tmp_path, model, monkeypatch):
    items = make_items(tmp_path / "items", n_text=6)
    ix, shards = tmp_path / "ix", tmp_path / "ix.shards"
    listed = discover([items]).items
    plan = [(n, listed[lo : lo + 4]) for n, lo in enumerate(range(0, len(listed), 4))]
    # Play rank 1 of 2, which encodes chunks 1, 3, … into shards; rank 0 never got to commit them.
    monkeypatch.setattr(ingest_module, "_world", lambda: (1, 2))
    monkeypatch.setattr(ingest_module, "_broadcast", lambda value: (plan, ingest_module.IngestReport(), None))
    monkeypatch.setattr(ingest_module, "_gather", lambda value: [value, value])
    ingest(ix, model, items, chunk_size=4, progress=False)
    assert sorted(p.name for p in shards.iterdir()) == [shard_name(n, chunk) for n, chunk in plan[1::2]]
    monkeypatch.undo()
    # A one-process rerun commits those shards and encodes only the other chunks.
    report = ingest(ix, model, items, chunk_size=4, progress=False)
    assert report.encoded == sum(len(chunk) for _, chunk in plan[0::2])
    assert report.index_size == len(expected_ids(items)) and not shards.exists()


def test_the_qdrant_backend_takes_the_same_ingest(tmp_path, model):
    pytest.importorskip("qdrant_client")
    items = make_items(tmp_path / "items")
    report = ingest(tmp_path / "q", model, items, backend="qdrant", dtype="fp32", progress=False)
    assert report.added == len(expected_ids(items)) and (tmp_path / "q" / "qdrant.json").is_file()
    with open_index(tmp_path / "q") as index:
        assert index.backend == "qdrant" and len(index) == report.added
        _, (meta,) = index.get(["red.png"])
    assert meta["caption"] == "a red square"
    again = ingest(tmp_path / "q", model, items, progress=False)  # the backend is found, nothing added twice
    assert (again.added, again.already) == (0, report.added)


def test_ingest_is_the_package_api():
    import metaembed.index

    assert metaembed.index.ingest is ingest
