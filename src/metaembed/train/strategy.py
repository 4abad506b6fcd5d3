"""How the trained model is spread over processes (``train.strategy``): DDP replicas or FSDP shards.

``ddp``: every process holds the whole model; accelerate wraps the loss module in DDP, which all-reduces
gradients. ``fsdp``: every process holds 1/N of each decoder layer's weights, gradients and optimizer state
(torch's ``fully_shard``, FSDP2) and all-gathers a layer's weights just before the layer runs.

Why ``fully_shard`` and not accelerate's FSDP plugin: this loop drives forward and backward itself
(GradCache's two phases, the cross-rank gather of positives) and checkpoints only the trainable tensors.
``fully_shard`` is one call per module that changes nothing else; the plugin would also take over the
wrapping, upcast trainable weights and bring its own checkpoint layout.

The shard units are the backbone's decoder layers: every rank runs every layer in every forward, so the
layers' all-gathers and reduce-scatters line up across ranks. Everything else — token embeddings, the
vision tower, Meta Tokens, projection — forms the root unit, gathered once per forward. The vision tower
is deliberately not a unit of its own: a rank whose batch holds no image would skip its all-gather while
the others wait in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from metaembed.train.loss import TrainConfigError

STRATEGIES = ("ddp", "fsdp")
OPTIMIZER_FILE = "optimizer.pt"  # ddp: the whole optimizer (and scheduler) state, written by rank 0
OPTIMIZER_SHARDS = "optimizer"  # fsdp: a torch.distributed.checkpoint directory, one shard per rank
SCHEDULER_FILE = "scheduler.pt"


class Replicated:
    """DDP through accelerate: the loss module is wrapped, the model's parameters stay plain tensors."""

    name = "ddp"

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator

    def shard(self, model: nn.Module, mixed_precision: str) -> None:
        """Nothing to do: DDP wraps in :meth:`wrap`, after the optimizer exists."""

    def wrap(self, loss_fn: nn.Module, optimizer: torch.optim.Optimizer):
        return self.accelerator.prepare(loss_fn, optimizer)

    def no_sync(self, module: nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
        """GradCache's chunks but the last skip the all-reduce; the last one syncs the summed gradients."""
        return lambda: self.accelerator.no_sync(module)

    def clip_grad_norm(self, parameters: list[nn.Parameter], max_norm: float) -> float:
        return float(self.accelerator.clip_grad_norm_(parameters, max_norm))

    def full_tensors(self, named: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
        """The tensors whole, on the CPU of the main process (an empty dict elsewhere); every rank calls it."""
        if not self.accelerator.is_main_process:
            return {}
        return {name: p.detach().contiguous().cpu() for name, p in named}

    def load_tensors(self, named: list[tuple[str, nn.Parameter]], saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, parameter in named:
                parameter.copy_(saved[name].to(parameter.dtype))

    def save_optimizer(self, directory: Path, optimizer, scheduler) -> None:
        if self.accelerator.is_main_process:
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, directory / OPTIMIZER_FILE
            )

    def load_optimizer(self, directory: Path, optimizer, scheduler) -> None:
        # weights_only: a checkpoint is data, never code (every value saved is a tensor or a plain type)
        blob = torch.load(directory / OPTIMIZER_FILE, map_location=self.accelerator.device, weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])


class Sharded(Replicated):
    """FSDP2: decoder layers and the root are ``fully_shard``-ed in place; parameters become DTensor shards."""

    name = "fsdp"

    def __init__(self, accelerator) -> None:
        super().__init__(accelerator)
        self.root: nn.Module | None = None

    def shard(self, model: nn.Module, mixed_precision: str) -> None:
        shard_model(model, self.accelerator.device.type, mixed_precision)
        self.root = model

    def wrap(self, loss_fn: nn.Module, optimizer: torch.optim.Optimizer):
        return loss_fn, self.accelerator.prepare(optimizer)

    def no_sync(self, module: nn.Module) -> None:
        """None: every GradCache chunk reduce-scatters its gradients into the shards. Skipping the sync would
        keep unsharded gradients of every layer until the last chunk — the memory FSDP is there to save."""
        return None

    def clip_grad_norm(self, parameters: list[nn.Parameter], max_norm: float) -> float:
        # the norm over every shard: clip_grad_norm_ reduces the DTensor norms across ranks
        return float(_full(torch.nn.utils.clip_grad_norm_(parameters, max_norm)))

    def full_tensors(self, named: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
        # one all-gather per tensor, on every rank; only the main process keeps a CPU copy
        main = self.accelerator.is_main_process
        tensors = {}
        for name, parameter in named:
            whole = _full(parameter.detach())
            if main:
                tensors[name] = whole.contiguous().cpu()
        return tensors

    def load_tensors(self, named: list[tuple[str, nn.Parameter]], saved: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import distribute_tensor

        with torch.no_grad():
            for name, parameter in named:
                whole = saved[name].to(device=parameter.device, dtype=parameter.dtype)
                # every rank read the same file: keep its own slice, no communication (src_data_rank=None)
                parameter.copy_(
                    distribute_tensor(whole, parameter.device_mesh, parameter.placements, src_data_rank=None)
                )

    def save_optimizer(self, directory: Path, optimizer, scheduler) -> None:
        """Each rank writes its own shard of the AdamW moments; nothing is gathered."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save(
            {"optimizer": get_optimizer_state_dict(self.root, optimizer)}, checkpoint_id=directory / OPTIMIZER_SHARDS
        )
        if self.accelerator.is_main_process:
            torch.save(scheduler.state_dict(), directory / SCHEDULER_FILE)

    def load_optimizer(self, directory: Path, optimizer, scheduler) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        state = {"optimizer": get_optimizer_state_dict(self.root, optimizer)}  # allocates the shards to read into
        dcp.load(state, checkpoint_id=directory / OPTIMIZER_SHARDS)
        set_optimizer_state_dict(self.root, optimizer, state["optimizer"])
        scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, weights_only=True))


def shard_model(model: nn.Module, device_type: str, mixed_precision: str = "no") -> None:
    """Shard a :class:`~metaembed.model.MetaEmbedModel` in place over all processes of the default group:
    each decoder layer is a unit, the model the root. Call it before building the optimizer (sharding
    replaces every parameter object with a DTensor shard).

    The model is the root so that ``model(batch, side)`` and ``model.encode_*`` gather what they use; each
    call is a collective, so every rank makes the same calls (encodes as many batches). Under ``bf16`` the
    gathered weights and the gradients are bf16 (FSDP's policy, instead of autocast), reduced in fp32.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = list(model.backbone.decoder_layers())
    if not layers:
        raise TrainConfigError(
            f"train.strategy=fsdp shards the backbone's decoder layers; backbone family "
            f"{model.config.backbone_family!r} does not name them (FSDP-ready families: {fsdp_families()}). "
            "Use train.strategy=ddp"
        )
    check_trainable_inside(model, layers)
    if not (dist.is_available() and dist.is_initialized()):
        raise TrainConfigError(
            "train.strategy=fsdp shards over the processes of a distributed launch, and this is a single process: "
            "start it with torchrun --nproc-per-node N or accelerate launch (docs/train.md), or use train.strategy=ddp"
        )
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def make_strategy(name: str, accelerator) -> Replicated:
    if name == "ddp":
        return Replicated(accelerator)
    if name == "fsdp":
        return Sharded(accelerator)
    raise TrainConfigError(f"train.strategy must be one of {STRATEGIES}, got {name!r}")


def checkpoint_strategy(directory: Path) -> str:
    """Which strategy wrote a checkpoint, from its optimizer files."""
    return "fsdp" if (directory / OPTIMIZER_SHARDS).is_dir() else "ddp"


def check_trainable_inside(model: nn.Module, layers: list[nn.Module]) -> None:
    """Under FSDP every trainable backbone tensor must sit in a decoder layer (LoRA's default targets).

    Full fine-tuning would also train the vision tower, which gets no gradient on a rank whose batch holds
    no image; FSDP reduce-scatters a unit's gradients only where they exist, so the ranks would disagree.
    """
    inside = {id(p) for layer in layers for p in layer.parameters()}
    outside = [n for n, p in model.backbone.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise TrainConfigError(
            f"train.strategy=fsdp trains the decoder layers' LoRA adapters and the Meta Tokens / head; "
            f"{len(outside)} trainable backbone tensors lie outside the decoder layers (e.g. {outside[0]}). "
            "A rank whose batch has no image gives the vision tower no gradient, which FSDP cannot reduce. "
            "Use lora.enabled=true with the default target_modules, or train.strategy=ddp"
        )


def fsdp_families() -> list[str]:
    """Backbone families whose adapter names its decoder layers."""
    from metaembed.model.backbones import FAMILIES, Backbone

    return sorted(f for f, adapter in FAMILIES.items() if adapter.decoder_layers is not Backbone.decoder_layers)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
