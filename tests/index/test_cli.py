from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from metaembed.cli import main
from metaembed.index import open_index
from metaembed.scoring import maxsim_reference

H = runpy.run_path(str(Path(__file__).with_name("helpers.py")))
embeddings, digest = H["embeddings"], H["digest"]


@pytest.fixture
def files(tmp_path):
    c = embeddings(12, 16, 8, seed=5)
    q = embeddings(2, 4, 8, seed=6)
    np.save(tmp_path / "c.npy", c.numpy())
    save_file({"embeddings": q}, str(tmp_path / "q.safetensors"))
    (tmp_path / "ids.txt").write_text("".join(f"doc {i}\n" for i in range(12)))
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps({"n": i}) + "\n" for i in range(12)))
    return tmp_path, c, q


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_build_search_stats_add_delete(files, capsys):
    tmp, c, q = files
    ix = tmp / "ix"
    code, out, _ = run(
        capsys,
        "index",
        "build",
        ix,
        "--embeddings",
        tmp / "c.npy",
        "--ids",
        tmp / "ids.txt",
        "--metadata",
        tmp / "meta.jsonl",
        "--dtype",
        "fp32",
    )
    assert code == 0 and "12 items" in out

    code, out, _ = run(
        capsys, "index", "search", ix, "--queries", tmp / "q.safetensors", "--budget", "4x8", "-k", "3", "--json"
    )
    assert code == 0
    results = json.loads(out)
    ref = maxsim_reference(q, c, "4x8").topk(3, dim=1)
    assert [r["ids"] for r in results] == [[f"doc {j}" for j in row] for row in ref.indices.tolist()]
    np.testing.assert_allclose([r["scores"] for r in results], ref.values.numpy(), atol=1e-4)
    assert results[0]["metadata"][0] == {"n": ref.indices[0, 0].item()}

    code, out, _ = run(capsys, "index", "search", ix, "--queries", tmp / "q.safetensors", "--budget", "2x4")
    assert code == 0 and "q.safetensors[1]:" in out and "doc" in out  # labelled by the query it is

    code, out, _ = run(capsys, "index", "stats", ix)
    assert code == 0 and "bytes per budget" in out and "16x64" not in out and "8x16" in out
    code, out, _ = run(capsys, "index", "stats", ix, "--json")
    assert json.loads(out)["bytes_per_budget"]["1x1"] == 12 * 8 * 4

    (tmp / "more.json").write_text(json.dumps(["x", "y"]))
    np.save(tmp / "more.npy", embeddings(2, 16, 8, seed=7).numpy())
    assert run(capsys, "index", "add", ix, "--embeddings", tmp / "more.npy", "--ids", tmp / "more.json")[0] == 0
    code, _, err = run(capsys, "index", "add", ix, "--embeddings", tmp / "more.npy", "--ids", tmp / "more.json")
    assert code == 2 and "upsert" in err
    assert (
        run(capsys, "index", "add", ix, "--embeddings", tmp / "more.npy", "--ids", tmp / "more.json", "--upsert")[0]
        == 0
    )
    code, out, _ = run(capsys, "index", "delete", ix, "x", "doc 0")
    assert code == 0 and "holds 12" in out
    with open_index(ix, read_only=True) as index:
        assert len(index) == 12 and "x" not in index and "y" in index


def test_cli_errors_are_one_line_and_leave_disk_unchanged(files, capsys):
    tmp = files[0]
    ix = tmp / "ix"
    assert run(capsys, "index", "build", ix, "--embeddings", tmp / "c.npy", "--ids", tmp / "ids.txt")[0] == 0
    before = digest(ix)
    cases = [
        (["index", "delete", ix, "nope"], "not in the index"),
        (["index", "search", ix, "--queries", tmp / "q.safetensors", "--budget", "4x32"], "r_c ≤ 16"),
        (["index", "add", ix, "--embeddings", tmp / "q.safetensors", "--ids", tmp / "ids.txt"], "R = 16"),
        (["index", "add", ix, "--embeddings", tmp / "missing.npy", "--ids", tmp / "ids.txt"], "does not exist"),
        (["index", "add", ix, "--embeddings", tmp / "ids.txt", "--ids", tmp / "ids.txt"], ".npy or .safetensors"),
        (["index", "stats", tmp / "nowhere"], "no index"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        assert message in err and err.count("\n") == 1, err
    assert digest(ix) == before


def test_build_failure_leaves_nothing(files, capsys):
    tmp = files[0]
    (tmp / "dup.json").write_text(json.dumps(["a"] * 12))
    code, _, err = run(capsys, "index", "build", tmp / "new", "--embeddings", tmp / "c.npy", "--ids", tmp / "dup.json")
    assert code == 2 and "repeat" in err
    assert not (tmp / "new").exists()
    obj = np.array([{"a": 1}], dtype=object)
    np.save(tmp / "obj.npy", obj, allow_pickle=True)
    code, _, err = run(
        capsys, "index", "build", tmp / "new", "--embeddings", tmp / "obj.npy", "--ids", tmp / "dup.json"
    )
    assert code == 2 and "object arrays are refused" in err
    assert not (tmp / "new").exists()
