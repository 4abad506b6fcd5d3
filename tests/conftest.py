"""Shared fixtures: tiny real transformers backbones built locally (no hub), once per session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_report_header(config) -> str:
    """Which MaxSim engine the scoring tests exercise on this machine (CI logs show it on the first lines)."""
    from metaembed import fused

    return f"metaembed scoring: fused bf16 / int8 MaxSim kernel {fused.status()}"


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    """``tiny_backbone(family)`` → directory of a tiny random Qwen2-VL / Qwen2.5-VL (cached per family)."""
    from metaembed.model.tiny import make_tiny_backbone

    made: dict[str, object] = {}

    def build(family: str = "qwen2_vl"):
        if family not in made:
            made[family] = make_tiny_backbone(tmp_path_factory.mktemp(family), family)
        return made[family]

    return build


@pytest.fixture
def tiny_model(tiny_backbone):
    """A fresh MetaEmbedModel (16 + 64 Meta Tokens) on the tiny Qwen2-VL backbone."""
    import torch

    from metaembed import MetaEmbedModel

    torch.manual_seed(0)
    return MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_backbone, tmp_path_factory):
    """A saved checkpoint directory of the tiny Qwen2-VL model, for commands that take ``--model DIR``."""
    import torch

    from metaembed import MetaEmbedModel

    torch.manual_seed(0)
    model = MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"))
    return model.save_pretrained(tmp_path_factory.mktemp("checkpoint") / "tiny")


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def benchmark_script():
    """``benchmark_script("kernel_claims")``: a script under benchmarks/ imported as a module (not a package)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def assert_rendered_in():
    """``assert_rendered_in(rendered, "docs/kernels.md")``: every non-blank line a benchmark renders is in the doc."""

    def check(rendered: str, doc: str) -> None:
        lines = (ROOT / doc).read_text().splitlines()
        missing = [line for line in rendered.splitlines() if line.strip() and line not in lines]
        assert not missing, f"{doc} lacks {len(missing)} rendered lines, e.g. {missing[0]!r}"

    return check
