"""kill -9 the writer at random points: every time, the index opens and holds exactly the acknowledged items
(the one operation in flight at the kill may have committed or not, never partly). Also kills at fixed points
inside a merge that extends its first segment in place: before and after its commit, and halfway through a file."""

from __future__ import annotations

import os
import random
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metaembed.index import create_index, open_index
from metaembed.index.layout import quantize_int8

HERE = Path(__file__).parent
item_embedding = runpy.run_path(str(HERE / "helpers.py"))["item_embedding"]
R, D = 16, 8


def stored_value(item_id: str, dtype: str) -> torch.Tensor:
    x = item_embedding(item_id, R, D)
    if dtype == "bf16":
        return x.bfloat16().float()
    if dtype == "int8":
        codes, scale = quantize_int8(x)
        return codes.float() * scale[..., None]
    return x


def apply(state: set[str], op: str, arg: str) -> set[str]:
    ids = arg.split(",") if arg else []
    if op == "add":
        return state | set(ids)
    if op == "delete":
        return state - set(ids)
    return set(state)  # compact changes nothing visible


def run_kills(tmp_path: Path, kills: int, dtype: str, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "ix"
    acked: set[str] = set()
    landed: dict[str, int] = {}  # what the writer was doing when killed -> count
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    for run in range(kills):
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "crash_writer.py"), str(path), dtype, str(run), str(rng.randrange(10**9))],
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / f"writer-{run}.err", "wb"),  # noqa: SIM115
            env=env,
        )
        first = proc.stdout.readline()
        assert first == b"READY\n", (tmp_path / f"writer-{run}.err").read_text()
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        out = proc.stdout.read()  # the same buffered reader as readline(), so nothing is skipped
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, (tmp_path / f"writer-{run}.err").read_text()
        lines = out.decode().split("\n")
        if lines[-1]:
            lines = lines[:-1]  # a line cut off by the kill: treat it as not written
        pending: tuple[str, str] | None = None
        for line in lines:
            if line.startswith("BEGIN "):
                op, _, arg = line[6:].partition(" ")
                pending = (op, arg)
            elif line == "ACK":
                acked = apply(acked, *pending)
                pending = None
        allowed = [acked] if pending is None else [acked, apply(acked, *pending)]
        key = "between operations" if pending is None else f"in {pending[0]}"

        with open_index(path) as ix:  # opens as the writer: the dead process's lock is gone
            held = set(ix.ids())
            assert held in allowed, (
                f"kill {run}: index holds {len(held)} ids, acknowledged {len(acked)}; "
                f"missing {sorted(acked - held)[:5]}, extra {sorted(held - acked)[:5]}, "
                f"pending {pending and pending[0]}"
            )
            if pending is not None and pending[0] != "compact":  # a compaction changes nothing visible
                key += " (committed)" if held != acked else " (rolled back)"
            landed[key] = landed.get(key, 0) + 1
            acked = held
            if held:
                sample = sorted(held)[:: max(1, len(held) // 20)]
                got, meta = ix.get(sample)
                want = torch.stack([stored_value(i, dtype) for i in sample])
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
                assert meta == [{"id": i} for i in sample]
                res = ix.search(want[:2], "4x8", k=1)
                assert res.ids[0][0] == sample[0]
            leftovers = [p.name for p in path.iterdir() if p.name.endswith(".tmp")]
            assert not leftovers, leftovers
    print(f"{kills} kills ({dtype}), where they landed: {dict(sorted(landed.items()))}; final items: {len(acked)}")
    if kills >= 50:
        assert any(k.startswith("in ") for k in landed), landed


@pytest.mark.parametrize("dtype", ["int8"])
def test_sigkill_writer_5_times(tmp_path, dtype):
    run_kills(tmp_path, kills=5, dtype=dtype, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_sigkill_writer_50_times(tmp_path, dtype):
    run_kills(tmp_path, kills=50, dtype=dtype, seed=2)


# ---------------------------------------------------------------------------- kills inside an in-place merge

KILLED_MERGE = """
    import os, signal, sys
    from metaembed.index import manifest, open_index, segment
    from metaembed.index.merge import MergePolicy

    path, point = sys.argv[1], sys.argv[2]
    ix = open_index(path, merge_policy=MergePolicy(on_write=False))

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    append, publish, calls = segment.SegmentWriter.append, manifest.publish, []

    def append_then_die(self, ids, metadata, parts):
        calls.append(1)
        if point == "appending" and len(calls) == 4:  # three inputs appended, the fourth cut off mid-file
            for handle in self._handles:
                handle.flush()
            self._handles[0].write(segment.tensor_bytes(parts[0])[:100])
            self._handles[0].flush()
            die()
        append(self, ids, metadata, parts)

    def publish_then_die(root, draft):
        if point == "before-publish":
            die()
        publish(root, draft)
        die()  # after the commit point, before the merged-away names are removed

    segment.SegmentWriter.append = append_then_die
    manifest.publish = publish_then_die
    print("merging", flush=True)
    ix.merge()
    print("not killed", flush=True)
"""


@pytest.mark.parametrize("point", ["appending", "before-publish", "after-publish"])
def test_sigkill_inside_an_in_place_merge(tmp_path, point):
    from metaembed.index import manifest as manifests
    from metaembed.index.merge import MergePolicy
    from metaembed.index.store import EmbeddedIndex

    path, dtype = tmp_path / "ix", "int8"
    ids = [f"b{b}-{i}" for b in range(10) for i in range(5)]
    with create_index(path, D, R, dtype=dtype, merge_policy=MergePolicy(on_write=False)) as ix:
        for b in range(10):
            batch = ids[5 * b : 5 * b + 5]
            ix.add(batch, torch.stack([item_embedding(i, R, D) for i in batch]), [{"id": i} for i in batch])
        base = ix.segments[0].name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    script = "\n".join(line[4:] for line in KILLED_MERGE.splitlines())
    done = subprocess.run([sys.executable, "-c", script, str(path), point], capture_output=True, env=env, timeout=120)
    assert done.returncode == -signal.SIGKILL and done.stdout == b"merging\n", done.stderr.decode()[-2000:]

    manifest = manifests.read(path)
    sizes = {
        name: ((path / name).stat().st_size, size)
        for seg in manifest["segments"]
        for name, size in manifests.segment_files(manifest, seg)
    }
    committed = point == "after-publish"
    assert [s["name"] == base for s in manifest["segments"]][:1] == [not committed]
    if point == "appending":  # the base's files hold bytes no manifest counts
        assert any(on_disk > counted for on_disk, counted in sizes.values())
    assert EmbeddedIndex.verify(path)[0] == []  # those bytes are not damage
    want = torch.stack([stored_value(i, dtype) for i in ids])
    with open_index(path, read_only=True) as reader:  # before any writer trims them: not rows
        assert sorted(reader.ids()) == sorted(ids)
        torch.testing.assert_close(reader.get(ids)[0], want, rtol=0, atol=1e-6)
    with open_index(path, merge_policy=MergePolicy(on_write=False)) as ix:  # the writer open cleans up
        named = {name for seg in ix._manifest["segments"] for name, _ in manifests.segment_files(ix._manifest, seg)}
        assert {p.name for p in path.iterdir()} == named | {"MANIFEST"}  # no orphan links, no .tmp
        for seg in ix._manifest["segments"]:
            for name, size in manifests.segment_files(ix._manifest, seg):
                assert (path / name).stat().st_size == size, name  # trimmed back to the rows
        assert sorted(ix.ids()) == sorted(ids)
        torch.testing.assert_close(ix.get(ids)[0], want, rtol=0, atol=1e-6)
        assert ix.merge() == (0 if committed else 1) and len(ix.segments) == 1
        res = ix.search(want[:2], "4x8", k=1)
        assert res.ids[0][0] == ids[0]
    assert EmbeddedIndex.verify(path)[0] == []
