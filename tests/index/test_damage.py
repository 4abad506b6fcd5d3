"""The embedded store when its files are damaged or its filesystem fails: a specific error, nothing lost.

Covers files truncated or overwritten while an index is open (never a SIGBUS, never a silent wrong result),
per-file checksums, a full disk during and after a write, the writer lock, readers racing a compaction, and
filesystem failures (missing files, directories where files belong, a read-only filesystem).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from metaembed.cli import main
from metaembed.index import (
    IndexFormatError,
    IndexLockedError,
    IndexStorageError,
    ReadOnlyIndexError,
    create_index,
    open_index,
    storage,
)
from metaembed.index import manifest as manifest_module
from metaembed.index import segment as segment_module
from metaembed.index.store import EmbeddedIndex

H = runpy.run_path(str(Path(__file__).with_name("helpers.py")))
embeddings, digest = H["embeddings"], H["digest"]
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _build(path: Path, dtype: str = "bf16", batches: int = 2) -> None:
    with create_index(path, dim=8, num_vectors=16, dtype=dtype) as ix:
        for b in range(batches):
            ix.add([f"b{b}-{i}" for i in range(20)], embeddings(20, 16, 8, seed=b))


def _vector_files(path: Path) -> list[Path]:
    return sorted(path.glob("seg-*.g*.bin"))


def _run_script(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=120, env=env
    )


# ---------------------------------------------------------------------------- files changed under an open index

TRUNCATE_THEN_SEARCH = """
    import os, sys, torch
    from metaembed.index import open_index, IndexFormatError
    path, read_only = sys.argv[1], sys.argv[2] == "reader"
    ix = open_index(path, read_only=read_only)
    queries = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
    ix.search(queries, "4x16", k=3)
    victim = sorted(f for f in os.listdir(path) if f.endswith(".g3.bin"))[0]
    os.truncate(os.path.join(path, victim), 0)
    try:
        ix.search(queries, "4x16", k=3)
    except IndexFormatError as error:
        print("IndexFormatError", error)
    else:
        print("no error")
"""


@pytest.mark.parametrize("mode", ["writer", "reader"])
def test_a_segment_truncated_while_open_is_an_error_not_a_sigbus(tmp_path, mode):
    _build(tmp_path / "ix")
    done = _run_script(TRUNCATE_THEN_SEARCH, str(tmp_path / "ix"), mode)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # -7 would be SIGBUS
    assert done.stdout.startswith("IndexFormatError") and "changed while the index was open" in done.stdout


READ_PAST_THE_END = """
    import os, sys, torch
    from metaembed.budget import Budget
    from metaembed.index import open_index, IndexFormatError
    from metaembed.index import mapguard
    assert mapguard.available()
    ix = open_index(sys.argv[1], read_only=True)
    segment = ix.segments[0]
    queries = torch.nn.functional.normalize(torch.randn(1, 4, 8), dim=-1)
    for mapped in segment.files:
        os.truncate(mapped.path, 0)
    # a read that starts before the truncation is noticed: the scoring kernel runs over the mapping itself
    segment.score(queries, Budget(4, 16), slice(0, segment.count))
    print("survived")
    try:
        ix.search(queries, "4x16", k=3)
    except IndexFormatError as error:
        print("IndexFormatError", error)
"""


def test_a_read_past_the_end_of_a_truncated_mapping_is_caught_and_reported(tmp_path):
    from metaembed.index import mapguard

    if not mapguard.available():
        pytest.skip("the map guard extension is not built (no C compiler at install time)")
    _build(tmp_path / "ix", dtype="int8", batches=1)
    done = _run_script(READ_PAST_THE_END, str(tmp_path / "ix"))
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.splitlines()[0] == "survived"
    assert "IndexFormatError" in done.stdout and "read ran past its end" in done.stdout


def _overwrite_inside(path: Path, value: bytes = b"\x7f\x80") -> None:
    """Same size, different bytes: bf16 0x7f80 is +Infinity."""
    data = bytearray(path.read_bytes())
    for at in range(0, len(data) - 1, 2):
        data[at : at + 2] = value[::-1]
    path.write_bytes(bytes(data))


def test_bytes_overwritten_in_a_small_vector_file_fail_its_checksum_on_open(tmp_path):
    _build(tmp_path / "ix")
    _overwrite_inside(_vector_files(tmp_path / "ix")[0])
    for read_only in (True, False):
        with pytest.raises(IndexFormatError, match="fails its checksum"):
            open_index(tmp_path / "ix", read_only=read_only)


def test_a_large_corrupt_file_is_found_by_verify_refused_by_compaction_and_never_ranks(tmp_path, monkeypatch, capsys):
    _build(tmp_path / "ix")
    monkeypatch.setattr(segment_module, "VERIFY_ON_OPEN_BYTES", 0)  # as if every file were too large to check on open
    victim = _vector_files(tmp_path / "ix")[0]
    _overwrite_inside(victim)
    queries = embeddings(1, 4, 8, seed=9).abs()  # positive · +Infinity: the scores are +Infinity, not NaN
    with open_index(tmp_path / "ix") as ix:
        with pytest.raises(IndexFormatError, match="non-finite"):
            ix.search(queries, "4x16", k=3)
        with pytest.raises(IndexFormatError, match="fails its checksum"):
            ix.compact()
    problems, checked = EmbeddedIndex.verify(tmp_path / "ix")
    assert problems == [f"{victim.name}: fails its checksum (corrupt)"] and checked == 2 * 5
    code = main(["index", "verify", str(tmp_path / "ix")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("metaembed index: error:") and victim.name in err
    np.save(tmp_path / "q.npy", queries.numpy())
    code = main(["index", "search", str(tmp_path / "ix"), "--queries", str(tmp_path / "q.npy"), "--budget", "4x16"])
    out, err = capsys.readouterr()
    assert code == 2 and "Infinity" not in out and "non-finite" in err


def test_verify_passes_an_intact_index(tmp_path, capsys):
    _build(tmp_path / "ix", dtype="int8")
    assert EmbeddedIndex.verify(tmp_path / "ix") == ([], 2 * 9)
    assert main(["index", "verify", str(tmp_path / "ix")]) == 0
    assert "18 files" in capsys.readouterr().out


# ---------------------------------------------------------------------------- a full disk


class _FullDisk:
    """An ``open`` for the store's module whose files accept ``room`` bytes, then raise ENOSPC."""

    def __init__(self, room: int = 100, only: str = "") -> None:
        self.room, self.only = room, only  # only files whose name holds ``only`` count against the room

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)  # noqa: SIM115
        if not set("wa+") & set(mode) or self.only not in str(file):  # r+b: an in-place merge appends
            return handle
        disk, write = self, handle.write

        def limited(data):
            if len(data) > disk.room:
                write(data[: disk.room])
                disk.room = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
            disk.room -= len(data)
            return write(data)

        handle.write = limited
        return handle


def test_a_full_disk_during_the_merge_after_an_add_does_not_fail_the_add(tmp_path, monkeypatch, caplog):
    path = tmp_path / "ix"
    with create_index(path, dim=8, num_vectors=16) as ix:
        for i in range(9):
            ix.add([f"item-{i}"], embeddings(1, 16, 8, seed=i))
        # room for the add's own vector files (1 x 16 x 8 bf16 = 256 bytes), none for the merge's
        monkeypatch.setattr(storage, "open", _FullDisk(room=256, only=".bin"), raising=False)
        with caplog.at_level(logging.WARNING, logger="metaembed.index.store"):
            ix.add(["item-9"], embeddings(1, 16, 8, seed=9))  # committed, then the merge of 10 segments fails
        assert "item-9" in ix and len(ix.segments) == 10
        assert "merging segments failed" in caplog.text
        named = {f"{s.name}.{suffix}" for s in ix.segments for suffix in ("g0.bin", "g1.bin", "g2.bin", "g3.bin")}
        assert {p.name for p in path.glob("seg-*.bin")} == named  # the merge's partial files are gone
        monkeypatch.undo()
        ix.add(["item-10"], embeddings(1, 16, 8, seed=10))  # the merge is retried after the next write
        assert len(ix.segments) == 2 and len(ix) == 11
    with open_index(path, read_only=True) as reader:
        assert len(reader) == 11


def test_a_full_disk_during_an_add_raises_a_storage_error_and_leaves_nothing(tmp_path, monkeypatch):
    from metaembed.index import storage

    path = tmp_path / "ix"
    _build(path, batches=1)
    before = digest(path)
    with open_index(path) as ix:
        monkeypatch.setattr(storage, "open", _FullDisk(room=300), raising=False)
        with pytest.raises(IndexStorageError, match="disk is full") as raised:
            ix.add(["new"], embeddings(1, 16, 8, seed=5))
        assert raised.value.errno == errno.ENOSPC
        monkeypatch.undo()
        assert "new" not in ix and digest(path) == before
        ix.add(["new"], embeddings(1, 16, 8, seed=5))  # once there is room, the same add succeeds
        assert "new" in ix


def test_a_full_disk_during_compact_removes_what_it_wrote(tmp_path, monkeypatch):
    path = tmp_path / "ix"
    _build(path, batches=3)
    before = digest(path)
    with open_index(path) as ix:
        monkeypatch.setattr(storage, "open", _FullDisk(room=1000), raising=False)
        with pytest.raises(IndexStorageError, match="disk is full"):
            ix.compact()
        monkeypatch.undo()
        assert digest(path) == before and len(ix) == 60


# ---------------------------------------------------------------------------- the writer lock


def test_deleting_the_lock_file_does_not_let_a_second_writer_in(tmp_path):
    path = tmp_path / "ix"
    _build(path, batches=1)
    with open_index(path) as writer:
        (path / "LOCK").unlink(missing_ok=True)
        with pytest.raises(IndexLockedError):
            open_index(path)
        writer.add(["still-mine"], embeddings(1, 16, 8, seed=3))
    with open_index(path) as reopened:
        assert "still-mine" in reopened and len(reopened) == 21


def test_a_writer_whose_directory_was_replaced_commits_nothing(tmp_path):
    path = tmp_path / "ix"
    _build(path, batches=1)
    with open_index(path) as writer:
        path.rename(tmp_path / "moved")
        shutil.copytree(tmp_path / "moved", path)
        before = digest(path)
        with pytest.raises(IndexLockedError, match="no longer the directory"):
            writer.add(["lost?"], embeddings(1, 16, 8, seed=3))
        assert digest(path) == before
        with open_index(path) as other:  # the copy is free for a writer of its own
            other.add(["theirs"], embeddings(1, 16, 8, seed=4))


# ---------------------------------------------------------------------------- readers racing a compaction


def test_a_reader_retries_when_a_compaction_removes_files_it_is_about_to_map(tmp_path, monkeypatch):
    path = tmp_path / "ix"
    _build(path, batches=1)
    writer = open_index(path)
    reader = open_index(path, read_only=True)
    writer.add(["late"], embeddings(1, 16, 8, seed=7))  # a new segment the reader has not mapped yet
    check = manifest_module.check_files
    compacted = []

    def check_then_compact(root, manifest):
        check(root, manifest)
        if not compacted:  # between the reader's manifest read and its mapping, the writer compacts
            compacted.append(True)
            writer.compact()

    monkeypatch.setattr(manifest_module, "check_files", check_then_compact)
    results = reader.search(embeddings(1, 4, 8, seed=8), "4x16", k=3)
    assert compacted and len(reader) == 21 and len(results.ids[0]) == 3
    reader.close()
    writer.close()


# ---------------------------------------------------------------------------- filesystem failures


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_a_missing_segment_file_is_a_format_error_everywhere(tmp_path, capsys):
    path = tmp_path / "ix"
    _build(path)
    _vector_files(path)[0].unlink()
    for read_only in (True, False):
        with pytest.raises(IndexFormatError, match="missing"):
            open_index(path, read_only=read_only)
    np.save(tmp_path / "q.npy", embeddings(1, 4, 8).numpy())
    code, err = _cli(capsys, "index", "search", path, "--queries", tmp_path / "q.npy", "--budget", "1x1")
    assert code == 2 and err.startswith("metaembed index: error:") and "Traceback" not in err
    code, err = _cli(capsys, "index", "stats", path)
    assert code == 2 and err.startswith("metaembed index: error:")


def test_a_manifest_replaced_by_a_directory_is_a_format_error(tmp_path, capsys):
    path = tmp_path / "ix"
    _build(path)
    (path / "MANIFEST").unlink()
    (path / "MANIFEST").mkdir()
    with pytest.raises(IndexFormatError, match="directory"):
        open_index(path, read_only=True)
    code, err = _cli(capsys, "index", "stats", path)
    assert code == 2 and err.startswith("metaembed index: error:")


def test_a_lock_path_replaced_by_a_directory_does_not_stop_the_writer(tmp_path):
    path = tmp_path / "ix"
    _build(path)
    shutil.rmtree(path / "LOCK", ignore_errors=True)
    (path / "LOCK").unlink(missing_ok=True)
    (path / "LOCK").mkdir()
    with open_index(path) as ix:
        ix.add(["x"], embeddings(1, 16, 8, seed=1))
        assert len(ix) == 41


def test_os_errors_map_to_index_errors():
    from metaembed.index.storage import storage_error

    cases = {
        errno.ENOSPC: (IndexStorageError, "disk is full"),
        errno.EROFS: (ReadOnlyIndexError, "read-only"),
        errno.EISDIR: (IndexFormatError, "directory"),
        errno.ENOENT: (IndexFormatError, "missing"),
        errno.EIO: (IndexStorageError, os.strerror(errno.EIO)),
    }
    for number, (kind, says) in cases.items():
        error = storage_error(OSError(number, os.strerror(number), "/x/f"), "write to the index at /x")
        assert type(error) is kind and says in str(error), (number, error)


READ_ONLY_FS = """
    set -e
    mount --bind -o ro "$1" "$1"
    "$2" -m metaembed.cli index search "$1" --queries "$3" --budget 4x16 -k 2 --json > "$4"
    "$2" -m metaembed.cli index add "$1" --embeddings "$3" --ids "$5" && exit 9 || echo "add exit $?"
"""


def test_an_index_on_a_read_only_filesystem_is_searched_and_writes_get_a_clear_error(tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare -rm (a user and mount namespace) to mount a read-only filesystem")
    path = tmp_path / "ix"
    _build(path)
    np.save(tmp_path / "q.npy", embeddings(1, 16, 8, seed=2).numpy())
    (tmp_path / "ids.txt").write_text("n\n")
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", READ_ONLY_FS, "sh", str(path), sys.executable, str(tmp_path / "q.npy"),
         str(tmp_path / "out.json"), str(tmp_path / "ids.txt")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(json.loads((tmp_path / "out.json").read_text())[0]["ids"]) == 2
    assert "add exit 2" in done.stdout and "metaembed index: error:" in done.stderr and "read-only" in done.stderr
    assert "Traceback" not in done.stderr
