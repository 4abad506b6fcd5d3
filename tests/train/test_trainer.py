"""The trainer on a tiny random Qwen2-VL: overfits a fixed batch, resumes to an identical state, saves a
model that loads, trains the baselines, and the CLI runs a recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from metaembed import MetaEmbedModel
from metaembed.errors import MetaEmbedError
from metaembed.train.recipe import load_recipe
from metaembed.train.trainer import MetaEmbedTrainer

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny-cpu.yaml"
SHAPES = Path(__file__).parents[2] / "recipes" / "data" / "shapes"


def _recipe(tiny_backbone, out, *extra):
    datasets = json.dumps([{"name": "t2i", "path": str(SHAPES / "shapes_t2i.jsonl"), "max_rows": 4}])
    return load_recipe(
        RECIPE,
        [
            f"model.backbone={tiny_backbone('qwen2_vl')}",
            f"train.output_dir={out}",
            f"data.datasets={datasets}",
            "train.log_steps=1",
            *extra,
        ],
    )


def _trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.trainable}


def test_loss_falls_on_a_fixed_batch_and_final_model_loads(tiny_backbone, tmp_path):
    trainer = MetaEmbedTrainer(_recipe(tiny_backbone, tmp_path, "train.max_steps=12", "train.warmup_steps=0"))
    final = trainer.train()
    losses = [row["loss"] for row in trainer.history]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert losses[-1] < math.log(4 + 1), losses  # below chance: 4 in-batch positives + 1 own negative
    assert set(trainer.history[0]) >= {"loss_1x1", "loss_16x64", "lr", "seconds_per_step"}
    loaded = MetaEmbedModel.from_pretrained(final)
    items = ["Find me an image of a red circle.", "a blue square"]
    torch.testing.assert_close(loaded.encode_queries(items), trainer.model.encode_queries(items))
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 12


def test_stop_and_resume_continue_from_identical_state(tiny_backbone, tmp_path):
    extra = ["train.max_steps=4", "train.save_steps=2", "lora.dropout=0.1"]
    straight = MetaEmbedTrainer(_recipe(tiny_backbone, tmp_path / "a", *extra))
    straight.train()
    first = MetaEmbedTrainer(_recipe(tiny_backbone, tmp_path / "b", *extra))
    first.train(stop_after=2)
    assert (tmp_path / "b" / "checkpoint-2").is_dir() and not (tmp_path / "b" / "final").exists()
    second = MetaEmbedTrainer(_recipe(tiny_backbone, tmp_path / "b", *extra))
    second.train(resume="latest")
    assert [r["loss"] for r in second.history] == [r["loss"] for r in straight.history]
    want, got = _trainable(straight), _trainable(second)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    assert second.optimizer.state_dict()["state"].keys() == straight.optimizer.state_dict()["state"].keys()


@pytest.mark.parametrize(
    ("variant", "pooling", "groups"), [("single-last", "last", ["loss_1x1"]), ("nommr", "meta", ["loss_16x64"])]
)
def test_baseline_variants_train_and_save_their_pooling(tiny_backbone, tmp_path, variant, pooling, groups):
    trainer = MetaEmbedTrainer(
        _recipe(tiny_backbone, tmp_path, f"loss.variant={variant}", "train.max_steps=2", "train.cache_chunk_size=3")
    )
    final = trainer.train()
    assert list(trainer.loss_fn.last_logs) == groups
    assert MetaEmbedModel.from_pretrained(final).config.pooling == pooling
    assert trainer.model.meta_tokens.weight.requires_grad == (pooling == "meta")


def test_recipe_errors_name_what_is_allowed(tmp_path):
    with pytest.raises(MetaEmbedError, match="unknown keys \\['max_stepz'\\]"):
        load_recipe(RECIPE, ["train.max_stepz=3"])
    with pytest.raises(MetaEmbedError, match=r"section\.key=value"):
        load_recipe(RECIPE, ["max_steps=3"])
    with pytest.raises(MetaEmbedError, match="unknown training variant"):
        load_recipe(RECIPE, ["loss.variant=colbert"])
    with pytest.raises(MetaEmbedError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    assert load_recipe(RECIPE, ["train.max_steps=3", "loss.groups=[[1,1],[16,64,2]]"]).loss.groups == [
        [1, 1],
        [16, 64, 2],
    ]


def test_cli_trains_a_recipe_and_resume_without_checkpoint_fails(tiny_backbone, tmp_path, capsys):
    from metaembed.cli import main

    datasets = json.dumps([{"path": str(SHAPES / "shapes_i2t.jsonl"), "image_root": str(SHAPES), "max_rows": 4}])
    args = [
        "train",
        str(RECIPE),
        f"model.backbone={tiny_backbone('qwen2_vl')}",
        f"train.output_dir={tmp_path / 'run'}",
        f"data.datasets={datasets}",
        "--quiet",
    ]
    assert main([*args[:2], *args[2:5], "train.max_steps=1", "--resume", "latest", "--quiet"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main([*args, "train.max_steps=2"]) == 0
    assert capsys.readouterr().out.strip().endswith("final")
    assert main([*args, "train.max_steps=3", "--resume", "latest"]) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log][-1] == 3


def test_a_recipe_starts_from_its_base(tmp_path):
    three, seven = (
        load_recipe(RECIPE.with_name("metaembed-3b.yaml")),
        load_recipe(RECIPE.with_name("metaembed-7b.yaml")),
    )
    assert three.model.backbone == "Qwen/Qwen2.5-VL-3B-Instruct" and three.train.strategy == "ddp"
    assert three.data.datasets == seven.data.datasets and three.loss == seven.loss and three.lora == seven.lora
    assert (three.train.batch_size, three.train.learning_rate) == (seven.train.batch_size, seven.train.learning_rate)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(MetaEmbedError, match="names itself as a base"):
        load_recipe(tmp_path / "a.yaml")


def test_yaml_no_means_no_mixed_precision():
    assert load_recipe(RECIPE, ["train.mixed_precision=no"]).train.mixed_precision == "no"


@pytest.mark.slow
def test_trainer_under_torchrun_two_processes(tiny_backbone, run_processes, tmp_path):
    args = ["-m", "metaembed.cli", "train", str(RECIPE), f"model.backbone={tiny_backbone('qwen2_vl')}"]
    run_processes([*args, f"train.output_dir={tmp_path}", "train.max_steps=4", "train.save_steps=2", "--quiet"])
    assert sorted(p.name for p in (tmp_path / "checkpoint-4").glob("rank-*.pt")) == ["rank-0.pt", "rank-1.pt"]
    assert MetaEmbedModel.from_pretrained(tmp_path / "final").config.lora is not None


@pytest.mark.slow
def test_mini_backbone_trains_in_bf16(tmp_path):
    trainer = MetaEmbedTrainer(
        load_recipe(
            RECIPE.with_name("mini-cpu.yaml"),
            [f"train.output_dir={tmp_path}", "train.max_steps=2", "train.batch_size=4", "train.threads=1"],
        )
    )
    final = trainer.train()
    loaded = MetaEmbedModel.from_pretrained(final)
    items = [{"text": "a red circle", "image": SHAPES / "images" / "red_circle.png"}]
    torch.testing.assert_close(loaded.encode_queries(items), trainer.model.encode_queries(items), atol=1e-5, rtol=0)


def test_head_learning_rate_applies_to_meta_tokens_only(tiny_backbone, tmp_path):
    trainer = MetaEmbedTrainer(_recipe(tiny_backbone, tmp_path, "train.head_learning_rate=0.5"))
    by_lr = {group["initial_lr"]: group["params"] for group in trainer.optimizer.param_groups}
    assert set(by_lr) == {0.5, trainer.recipe.train.learning_rate}
    assert [p.shape for p in by_lr[0.5]] == [trainer.model.meta_tokens.weight.shape]
    assert all(g["weight_decay"] == 0.0 for g in trainer.optimizer.param_groups if g["params"] == by_lr[0.5])


def test_numbers_without_a_dot_are_numbers():
    recipe = load_recipe(RECIPE, ["train.learning_rate=3e-3", "train.head_learning_rate=1e-2"])
    assert recipe.train.learning_rate == 0.003 and recipe.train.head_learning_rate == 0.01
    with pytest.raises(MetaEmbedError, match="must be a number"):
        load_recipe(RECIPE, ["train.learning_rate=fast"])


def test_regulariser_keys_reach_the_model_loss_and_head_learning_rate(tiny_backbone, tmp_path):
    """Slot read-out, orthogonal Meta Tokens, annealed soft MaxSim and the diversity penalty from recipe keys."""
    keys = ["model.meta_anchor=slots", "model.lone_slot=attention", "model.meta_init=orthogonal"]
    keys += [
        "loss.soft_max_temperature=0.1",
        "loss.soft_max_anneal_steps=2",
        "loss.diversity_weight=0.1",
        "loss.diversity_margin=0.25",
        "train.head_learning_rate=0.5",
    ]
    trainer = MetaEmbedTrainer(_recipe(tiny_backbone, tmp_path, *keys, "train.max_steps=3", "train.cache_chunk_size=3"))
    assert trainer.loss_fn.diversity_margin == 0.25
    norms = trainer.model.meta_tokens.weight.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, float(norms[0])))
    assert norms[0] > 0.1  # token-embedding length, not the 0.02-std normal init
    head = {id(p) for g in trainer.optimizer.param_groups if g["initial_lr"] == 0.5 for p in g["params"]}
    for name in ("slot_readout.query.weight", "slot_readout.key.weight", "meta_residual.weight"):
        assert id(dict(trainer.model.named_parameters())[name]) in head, name
    final = trainer.train()
    assert [row["soft_max_temperature"] for row in trainer.history] == pytest.approx([0.1, 0.05, 0.0])
    assert all(0 < row["diversity"] <= 1 for row in trainer.history)
    reloaded = MetaEmbedModel.from_pretrained(final).config
    assert (reloaded.meta_anchor, reloaded.lone_slot) == ("slots", "attention")


def test_warm_start_copies_the_trained_backbone_and_keeps_fresh_meta_tokens(tiny_backbone, tmp_path):
    source = MetaEmbedTrainer(_recipe(tiny_backbone, tmp_path / "source", "train.max_steps=2", "train.warmup_steps=0"))
    source_dir = source.train()
    trained = {n: p.detach().clone() for n, p in source.model.backbone.named_parameters() if p.requires_grad}
    keys = [f"model.warm_start={source_dir}", "model.meta_anchor=slots", "train.max_steps=1", "train.seed=7"]
    warm = MetaEmbedTrainer(_recipe(tiny_backbone, tmp_path / "warm", *keys))
    copied = {n: p for n, p in warm.model.backbone.named_parameters() if p.requires_grad}
    assert copied.keys() == trained.keys()
    for name, parameter in copied.items():
        torch.testing.assert_close(parameter, trained[name], atol=0, rtol=0, msg=name)
    assert warm.model.config.meta_anchor == "slots"
    assert not torch.equal(warm.model.meta_tokens.weight, source.model.meta_tokens.weight)
    with pytest.raises(MetaEmbedError, match="no match of the same shape"):
        MetaEmbedTrainer(_recipe(tiny_backbone, tmp_path / "bad", f"model.warm_start={source_dir}", "lora.r=4"))
