"""docs/serve.md's quick start runs as written: a real server process, queried with curl."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "serve.md"
DOCUMENTS, IDS = ["a red bicycle leaning on a wall", "quarterly revenue table"], ["bike", "revenue"]  # as the doc adds


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_quick_start_runs(tmp_path):
    from PIL import Image

    from metaembed import MetaEmbedModel
    from metaembed.scoring import maxsim_reference

    script = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.DOTALL)[0]
    script = script.replace("/tmp/", f"{tmp_path}/").replace("8000", str(_free_port()))
    assert json.dumps(DOCUMENTS) in script and json.dumps(IDS) in script
    bin_dir = tmp_path / "bin"  # `metaembed` and `python` as in an installed environment
    bin_dir.mkdir()
    (bin_dir / "metaembed").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m metaembed.cli "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("METAEMBED_API_KEY", None)
    result = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = [json.loads(line) for line in re.findall(r"^\{.*\}$", result.stdout.replace("}{", "}\n{"), re.M)]
    kinds = [o.get("object") for o in outputs]
    assert kinds == ["index.add", "search.result", "list", "list", "search.result"], result.stdout[-2000:]
    assert outputs[0]["index_size"] == 2
    assert outputs[1]["budget"] == "4x8"
    assert outputs[2]["data"][0]["shape"] == [2, 64] and isinstance(outputs[3]["data"][0]["embedding"], str)
    # the checkpoint is random: the expected order is exact MaxSim over what the bf16 index holds
    model = MetaEmbedModel.from_pretrained(tmp_path / "metaembed-ckpt")
    stored = model.encode_candidates(DOCUMENTS).bfloat16().float()
    image = Image.open(tmp_path / "metaembed-red.png")
    for output, query, budget in ((outputs[1], "red bike", "4x8"), (outputs[4], image, None)):
        want = maxsim_reference(model.encode_queries([query]), stored, budget)[0]
        order = want.argsort(descending=True)[: len(output["results"])].tolist()
        assert [hit["id"] for hit in output["results"]] == [IDS[i] for i in order], (want, output)
        assert [hit["score"] for hit in output["results"]] == pytest.approx([float(want[i]) for i in order], rel=2e-3)
