"""The trainer under ``train.strategy=fsdp`` on 2 gloo processes: ``accelerate launch`` runs the tiny recipe end to
end; a run stopped and resumed equals the uninterrupted one; the model a sharded run saves loads on one process
and encodes identically. Plus the errors for set-ups FSDP does not take."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metaembed import MetaEmbedModel
from metaembed.errors import MetaEmbedError
from metaembed.train.recipe import load_recipe
from metaembed.train.strategy import shard_model
from metaembed.train.trainer import MetaEmbedTrainer

WORKER = Path(__file__).with_name("fsdp_trainer_worker.py")
ROOT = Path(__file__).parents[2]
CPU_CONFIG = ROOT / "recipes" / "accelerate" / "cpu-2-processes.yaml"


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def worker():
    return runpy.run_path(str(WORKER))


@pytest.fixture(scope="module")
def launched(tiny_backbone, worker, run_processes, tmp_path_factory) -> Path:
    """The uninterrupted run: ``accelerate launch`` with the 2-process CPU config, through the CLI."""
    out = tmp_path_factory.mktemp("launched")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG)]
    accelerate += ["--main_process_port", str(_free_port())]  # not the config's 29500: other runs may hold it
    overrides = worker["overrides"](str(tiny_backbone("qwen2_vl")), out)
    run_processes(["-m", "metaembed.cli", "train", str(worker["RECIPE"]), *overrides, "--quiet"], accelerate)
    return out


@pytest.fixture(scope="module")
def resumed(tiny_backbone, run_processes, tmp_path_factory) -> tuple[Path, dict]:
    """The same recipe stopped after 2 steps and resumed (torchrun), and what the worker measured."""
    out = tmp_path_factory.mktemp("resumed")
    run_processes([str(WORKER), str(tiny_backbone("qwen2_vl")), str(out / "run"), str(out / "result.pt")])
    return out / "run", torch.load(out / "result.pt", weights_only=True)


def test_accelerate_launch_runs_the_tiny_recipe_sharded(launched):
    log = [json.loads(line) for line in (launched / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    checkpoint = launched / "checkpoint-4"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["strategy"] == "fsdp"
    assert sorted(p.name for p in checkpoint.glob("rank-*.pt")) == ["rank-0.pt", "rank-1.pt"]
    assert len(list((checkpoint / "optimizer").glob("*.distcp"))) == 2  # one optimizer shard per rank
    model = MetaEmbedModel.from_pretrained(launched / "final")
    assert model.config.lora is not None
    trained = load_file(checkpoint / "trainable.safetensors")
    assert any("lora_" in name for name in trained) and "meta_tokens.weight" in trained
    assert trained["meta_tokens.weight"].shape == model.meta_tokens.weight.shape  # whole, not a shard


def test_stopped_and_resumed_sharded_run_equals_the_uninterrupted_one(launched, resumed):
    run, result = resumed
    log = [json.loads(line)["loss"] for line in (launched / "log.jsonl").read_text().splitlines()]
    assert result["losses"] == log
    straight = load_file(launched / "checkpoint-4" / "trainable.safetensors")
    assert result["trainable"].keys() == straight.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(result["trainable"][name], tensor, rtol=0, atol=0, msg=name)
    assert not torch.equal(
        straight["meta_tokens.weight"], load_file(run / "checkpoint-2" / "trainable.safetensors")["meta_tokens.weight"]
    )


def test_model_saved_sharded_loads_on_one_process_with_identical_encodings(worker, resumed):
    run, result = resumed
    model = MetaEmbedModel.from_pretrained(run / "final")
    torch.testing.assert_close(model.encode_queries(worker["QUERIES"]), result["encodings"]["query"])
    torch.testing.assert_close(model.encode_candidates(worker["CANDIDATES"]), result["encodings"]["candidate"])


def test_fsdp_refuses_what_it_cannot_shard(tiny_backbone, tmp_path):
    recipe = ROOT / "recipes" / "tiny-cpu.yaml"
    with pytest.raises(MetaEmbedError, match=r"train\.strategy must be one of"):
        load_recipe(recipe, ["train.strategy=zero3"])
    with pytest.raises(MetaEmbedError, match="fp16 needs a loss scaler"):
        load_recipe(recipe, ["train.strategy=fsdp", "train.mixed_precision=fp16"])
    full = MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"))  # full fine-tuning: the vision tower trains too
    with pytest.raises(MetaEmbedError, match="lie outside the decoder layers"):
        shard_model(full, "cpu")
    keys = [f"model.backbone={tiny_backbone('qwen2_vl')}", f"train.output_dir={tmp_path}", "train.strategy=fsdp"]
    with pytest.raises(MetaEmbedError, match="this is a single process"):
        MetaEmbedTrainer(load_recipe(recipe, keys))


def test_fsdp_names_the_backbones_it_can_shard(tmp_path):
    from metaembed.model.tiny import make_tiny_gemma3_text

    model = MetaEmbedModel.from_backbone(make_tiny_gemma3_text(tmp_path / "gemma"))
    assert model.config.backbone_family == "text"
    with pytest.raises(MetaEmbedError, match=r"family 'text' does not name them .*'qwen2_5_vl', 'qwen2_vl'"):
        shard_model(model, "cpu")
