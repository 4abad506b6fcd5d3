"""The training loop: accelerate (DDP or FSDP under ``torchrun`` / ``accelerate launch``), LoRA, GradCache, resume.

Why an accelerate loop and not a ``transformers.Trainer`` subclass: cached mini-batches need a
two-phase forward/backward (embed without a graph, loss, re-forward per chunk under ``no_sync``) that
``Trainer.training_step`` hides; ``MetaEmbedModel`` is not a ``PreTrainedModel``, so ``Trainer``'s
checkpointing would save the whole backbone every time, where a LoRA run needs only its adapter, Meta
Tokens and projection; and the data stream (a resumable weighted mixture, fixed global batch for the
cross-rank gather) does not fit a ``Sampler``. accelerate still gives device placement, the process
group, DDP, autocast and gradient sync — about 200 lines here instead of overriding half of ``Trainer``.
``train.strategy: fsdp`` shards the decoder layers with torch's ``fully_shard`` instead (``strategy.py``).

A checkpoint ``output_dir/checkpoint-{step}/`` holds the trainable tensors, the optimizer, the
scheduler, every rank's RNG and data-stream state and the log history: a resumed run continues from
the identical state. The trainable tensors are one whole (gathered) safetensors file under either
strategy; the optimizer state is one file under DDP and one shard per rank under FSDP. The final model is
written with ``save_pretrained`` to ``output_dir/final``.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from metaembed.errors import CheckpointError
from metaembed.train.build import build_model, trained_model
from metaembed.train.data import Mixture, collate
from metaembed.train.gradcache import cached_loss_backward
from metaembed.train.loss import MatryoshkaMultiVectorLoss, TrainConfigError, variant_groups
from metaembed.train.recipe import Recipe
from metaembed.train.strategy import checkpoint_strategy, make_strategy

log = logging.getLogger("metaembed.train")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINABLE_FILE = "trainable.safetensors"
FINAL_DIR = "final"


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = [(int(match.group(1)), p) for p in output_dir.glob("checkpoint-*") if (match := CHECKPOINT.match(p.name))]
    complete = [(step, p) for step, p in found if (p / "trainer_state.json").is_file()]
    return max(complete)[1] if complete else None


class MetaEmbedTrainer:
    """Trains a :class:`~metaembed.model.MetaEmbedModel` with the MMR loss as a recipe says.

    Example:
        >>> trainer = MetaEmbedTrainer(load_recipe("recipes/tiny-cpu.yaml", ["train.max_steps=5"]))  # doctest: +SKIP
        >>> final_dir = trainer.train()          # or trainer.train(resume="latest")
        >>> MetaEmbedModel.from_pretrained(final_dir)
    """

    def __init__(self, recipe: Recipe) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        self.recipe = recipe
        t = recipe.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.output_dir = Path(t.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=t.mixed_precision,
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise TrainConfigError(
                f"the accelerate launch config selects {self.accelerator.distributed_type.value}; metaembed shards "
                "through its recipe: launch with a multi-GPU config (or --multi_gpu) and set train.strategy=fsdp"
            )
        self.strategy = make_strategy(t.strategy, self.accelerator)
        self._seed_everything(t.seed)  # the same initial weights on every rank
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with self.accelerator.main_process_first():  # rank 0 writes a tiny/mini backbone, the others then read it
            self.model = build_model(recipe, self.output_dir)
        self.strategy.shard(self.model, t.mixed_precision)  # before the optimizer: FSDP replaces the parameters
        n_q, n_c = self.model.num_vectors("query"), self.model.num_vectors("candidate")
        groups = recipe.loss.groups or variant_groups(recipe.loss.variant, n_q, n_c)
        loss_recipe = recipe.loss
        self.loss_fn = MatryoshkaMultiVectorLoss(
            self.model,
            groups,
            loss_recipe.temperature,
            loss_recipe.gather,
            loss_recipe.normalize_scores,
            soft_max_temperature=loss_recipe.soft_max_temperature,
            soft_max_anneal_steps=loss_recipe.soft_max_anneal_steps,
            diversity_weight=loss_recipe.diversity_weight,
            diversity_margin=loss_recipe.diversity_margin,
        )
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise TrainConfigError("nothing to train: every parameter is frozen")
        optimizer = torch.optim.AdamW(_param_groups(self.trainable, t), lr=t.learning_rate)
        from transformers import get_linear_schedule_with_warmup

        self.module, self.optimizer = self.strategy.wrap(self.loss_fn, optimizer)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer.optimizer, t.warmup_steps, t.max_steps)
        self.data = Mixture(
            recipe.dataset_specs(),
            seed=t.seed,
            rank=self.accelerator.process_index,
            on_bad_record=recipe.data.on_bad_record,
        )
        self.step = 0
        self.history: list[dict] = []
        self.grad_norm: float | None = None
        self._seed_everything(t.seed + 1 + self.accelerator.process_index)  # dropout differs per rank

    def close(self) -> None:
        """End the run on this rank: drop the DDP wrapper and destroy the process group (every rank calls it).

        Without it the gloo/NCCL group outlives ``main`` and is torn down during interpreter shutdown,
        where gloo can abort the process ("terminate called without an active exception").
        """
        import gc

        self.module = None
        gc.collect()  # DDP's reducer sits in reference cycles: free it while the process group still exists
        self.accelerator.end_training()

    # ------------------------------------------------------------------------------------- train
    def train(self, resume: str | Path | None = None, *, stop_after: int | None = None) -> Path:
        """Run to ``train.max_steps`` (or ``train.max_minutes``, or ``stop_after`` more steps); return the
        final model directory (written only when the run reaches its end or its time limit)."""
        if resume:
            self.resume(resume)
        t = self.recipe.train
        acc = self.accelerator
        if acc.is_main_process:
            (self.output_dir / "recipe.yaml").write_text(yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))
            log.info(
                "training %s: %d trainable tensors (%s parameters), groups %s, %d processes, batch %d/device",
                self.recipe.loss.variant,
                len(self.trainable),
                f"{sum(p.numel() for _, p in self.trainable):,}",
                [g.name for g in self.loss_fn.groups],
                acc.num_processes,
                t.batch_size,
            )
        self.module.train()
        started = time.monotonic()
        stop_at = t.max_steps if stop_after is None else min(t.max_steps, self.step + stop_after)
        from tqdm.auto import tqdm

        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not acc.is_main_process or not sys.stderr.isatty(),
        )
        window_start, window_steps, window_loss = time.monotonic(), 0, 0.0
        timed_out = False
        try:
            while self.step < stop_at:
                loss = self._train_step()
                self.step += 1
                window_steps += 1
                window_loss += loss
                bar.update(1)
                if self.step % t.log_steps == 0 or self.step == stop_at:
                    now = time.monotonic()
                    self._log(window_loss / window_steps, (now - window_start) / window_steps)
                    bar.set_postfix(loss=f"{window_loss / window_steps:.4f}")
                    window_start, window_steps, window_loss = now, 0, 0.0
                if t.max_minutes is not None and (time.monotonic() - started) / 60 >= t.max_minutes:
                    timed_out = True
                    log.info("train.max_minutes=%s reached at step %d: stopping", t.max_minutes, self.step)
                    break
                if self.step % t.save_steps == 0 and self.step < stop_at:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            log.warning("interrupted at step %d: saving a checkpoint (resume with --resume latest)", self.step)
            self.save_checkpoint()
            raise
        finally:
            bar.close()
        self.save_checkpoint()
        final = self.output_dir / FINAL_DIR
        if self.step >= t.max_steps or timed_out:
            self._save_final(final)
        return final

    def _save_final(self, final: Path) -> None:
        """``save_pretrained`` on the main process; a sharded model is first rebuilt whole there (the
        backbone from its files, the trained tensors gathered), since no process holds all of its weights."""
        acc = self.accelerator
        if self.strategy.name == "fsdp":
            tensors = self.strategy.full_tensors(self.trainable)  # a collective: every rank takes part
            if acc.is_main_process:
                trained_model(self.recipe, self.output_dir, tensors).save_pretrained(final)
        elif acc.is_main_process:
            self.model.save_pretrained(final)
        if acc.is_main_process:
            log.info("final model written to %s", final)
        acc.wait_for_everyone()

    def _train_step(self) -> float:
        t, acc = self.recipe.train, self.accelerator
        examples = self.data.next_batch(t.batch_size, self.recipe.data.batch_by_dataset)
        batch = collate(self.model, examples, self.recipe.data.num_negatives, t.cache_chunk_size)
        self.loss_fn.step = self.step  # soft-max annealing follows the training step
        if t.cache_chunk_size:
            loss = cached_loss_backward(
                self.module,
                self.loss_fn,
                batch,
                device=acc.device,
                backward=acc.backward,
                no_sync=self.strategy.no_sync(self.module),
            )
        else:
            loss = self.module(batch)
            acc.backward(loss)
        self.grad_norm = None
        if t.max_grad_norm:
            self.grad_norm = self.strategy.clip_grad_norm([p for _, p in self.trainable], t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _log(self, loss: float, seconds_per_step: float) -> None:
        record = {
            "step": self.step,
            "loss": round(loss, 6),
            **{name: round(value, 6) for name, value in self.loss_fn.last_logs.items()},
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": self.grad_norm,
            "seconds_per_step": round(seconds_per_step, 4),
            "bad_records": sum(self.data.bad.values()),
        }
        self.history.append(record)
        if self.accelerator.is_main_process:
            with open(self.output_dir / "log.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            log.info(
                "step %d/%d loss %.4f %s lr %.2e %.2fs/step",
                self.step,
                self.recipe.train.max_steps,
                loss,
                " ".join(f"{k.removeprefix('loss_')}={v:.3f}" for k, v in self.loss_fn.last_logs.items()),
                record["lr"],
                seconds_per_step,
            )

    # -------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        target = self.output_dir / f"checkpoint-{self.step}"
        staging = self.output_dir / f".checkpoint-{self.step}.partial"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(self._rank_state(), staging / f"rank-{acc.process_index}.pt")
        tensors = self.strategy.full_tensors(self.trainable)
        if acc.is_main_process:
            save_file(tensors, staging / TRAINABLE_FILE)
        self.strategy.save_optimizer(staging, self.optimizer.optimizer, self.scheduler)
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "step": self.step,
                "world_size": acc.num_processes,
                "strategy": self.strategy.name,
                "history": self.history,
            }
            (staging / "trainer_state.json").write_text(json.dumps(state, indent=1))
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
            self._prune_checkpoints()
            log.info("checkpoint %s", target)
        acc.wait_for_everyone()
        return target

    def _rank_state(self) -> dict:
        state = {
            "data": self.data.state_dict(),
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _prune_checkpoints(self) -> None:
        limit = self.recipe.train.save_total_limit
        if not limit:
            return
        found = sorted(
            (int(m.group(1)), p) for p in self.output_dir.glob("checkpoint-*") if (m := CHECKPOINT.match(p.name))
        )
        for _, path in found[:-limit]:
            shutil.rmtree(path, ignore_errors=True)

    def resume(self, where: str | Path) -> None:
        """Restore the state of ``checkpoint-N`` (``"latest"``: the newest complete one in output_dir)."""
        path = latest_checkpoint(self.output_dir) if str(where) == "latest" else Path(where)
        if path is None:
            raise CheckpointError(f"--resume latest: no complete checkpoint-* in {self.output_dir}")
        if not (path / "trainer_state.json").is_file():
            raise CheckpointError(f"{path} is not a complete training checkpoint (trainer_state.json is missing)")
        state = json.loads((path / "trainer_state.json").read_text())
        acc = self.accelerator
        if state["world_size"] != acc.num_processes:
            raise CheckpointError(
                f"{path} was written by {state['world_size']} processes; resume with the same number "
                f"(now {acc.num_processes}) so every rank's data stream continues"
            )
        written_by = checkpoint_strategy(path)
        if written_by != self.strategy.name:
            raise CheckpointError(
                f"{path} was written with train.strategy={written_by}; resume with the same strategy "
                f"(now {self.strategy.name})"
            )
        saved = load_file(path / TRAINABLE_FILE)
        names = {n for n, _ in self.trainable}
        if set(saved) != names:
            raise CheckpointError(
                f"{path}: trainable tensors differ from this recipe's model "
                f"(missing {sorted(names - set(saved))[:3]}, extra {sorted(set(saved) - names)[:3]})"
            )
        self.strategy.load_tensors(self.trainable, saved)
        self.strategy.load_optimizer(path, self.optimizer.optimizer, self.scheduler)
        # weights_only: a checkpoint is data, never code (every value saved is a tensor or a plain type)
        rank = torch.load(path / f"rank-{acc.process_index}.pt", weights_only=True)
        self.data.load_state_dict(rank["data"])
        torch.set_rng_state(rank["torch"])
        np.random.set_state(_numpy_state_from_plain(rank["numpy"]))
        random.setstate(rank["python"])
        if "cuda" in rank and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rank["cuda"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        log.info("resumed from %s at step %d", path, self.step)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)


# trained from scratch, not adapted
HEAD_PARAMETERS = ("meta_tokens.", "meta_residual.", "slot_readout.", "projection.", "backbone.projector.")


def _param_groups(trainable: list[tuple[str, torch.nn.Parameter]], t) -> list[dict]:
    """AdamW groups: weight decay only on matrices (never Meta Tokens); ``head_learning_rate`` for the
    parts trained from scratch (Meta Tokens, anchor maps, projection, the mini projector)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in trainable:
        head = name.startswith(HEAD_PARAMETERS)
        decay = parameter.ndim >= 2 and not name.startswith("meta_tokens.")
        groups.setdefault((head, decay), []).append(parameter)
    head_lr = t.head_learning_rate if t.head_learning_rate is not None else t.learning_rate
    return [
        {"params": params, "weight_decay": t.weight_decay if decay else 0.0, "lr": head_lr if head else t.learning_rate}
        for (head, decay), params in sorted(groups.items())
    ]


def _numpy_state_to_plain(state: tuple) -> tuple:
    """NumPy's legacy RNG state with its key array as a list, so ``torch.load(weights_only=True)`` reads it."""
    name, keys, position, has_gauss, cached = state
    return (name, keys.tolist(), int(position), int(has_gauss), float(cached))


def _numpy_state_from_plain(state: tuple) -> tuple:
    name, keys, position, has_gauss, cached = state
    return (name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached)
