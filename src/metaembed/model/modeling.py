"""MetaEmbedModel: a backbone plus Meta Tokens, read out as a normalised multi-vector embedding."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from metaembed.budget import Budget
from metaembed.errors import CheckpointError, MetaEmbedError
from metaembed.model.backbones import Backbone, Processor, adapter_for, detect_family
from metaembed.model.card import render_model_card
from metaembed.model.config import MetaEmbedConfig
from metaembed.model.items import ItemLike, check_batch, to_items
from metaembed.model.loading import parse_dtype, resolve_checkpoint
from metaembed.model.meta_tokens import MetaSlots, Side, meta_slots
from metaembed.model.pooling import pool_hidden
from metaembed.model.readout import SlotReadout, slot_groups

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
META_INIT_STD = 0.02  # Qwen2.5-VL's initializer_range, which the official code's fresh nn.Embedding gets
META_INITS = ("normal", "orthogonal")


class MetaEmbedModel(nn.Module):
    """Encodes queries and candidates into ``(R, D)`` L2-normalised Meta-Token embeddings.

    Build one from a Hugging Face backbone with :meth:`from_backbone`, or load a saved one with
    :meth:`from_pretrained`. Score with :func:`metaembed.maxsim` at any budget.

    Example:
        >>> model = MetaEmbedModel.from_pretrained("path/to/checkpoint")  # doctest: +SKIP
        >>> q = model.encode_queries(["a red bicycle"], budget="4x8")  # (1, 4, D)
        >>> c = model.encode_candidates([Path("bike.jpg")], budget="4x8")  # (1, 8, D)
        >>> metaembed.maxsim(q, c)
    """

    def __init__(self, config: MetaEmbedConfig, backbone: Backbone, processor: Processor) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.processor_impl = processor
        hidden = backbone.hidden_size
        self.meta_tokens = nn.Embedding(config.num_query_tokens + config.num_candidate_tokens, hidden)
        nn.init.normal_(self.meta_tokens.weight, std=META_INIT_STD)
        self.projection = nn.Linear(hidden, config.dim) if config.dim is not None else None
        self.meta_residual = None  # with a meta_anchor: vectors = the anchor + this map of the states
        if config.meta_anchor is not None:
            self.meta_residual = nn.Linear(hidden, hidden, bias=False)
            nn.init.zeros_(self.meta_residual.weight)  # a fresh model reads out exactly the anchor
        self.slot_readout = SlotReadout(hidden, config.lone_slot) if config.meta_anchor == "slots" else None
        dtype = next(backbone.parameters()).dtype
        for module in (self.meta_tokens, self.projection, self.meta_residual, self.slot_readout):
            if module is not None:
                module.to(dtype)

    # ----------------------------------------------------------------------------------------- build
    @classmethod
    def from_backbone(
        cls,
        name_or_path: str | Path,
        *,
        family: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        meta_init: str = "normal",
        **config_overrides,
    ) -> MetaEmbedModel:
        """A new MetaEmbed model (fresh Meta Tokens) on a transformers backbone.

        ``name_or_path`` is a local directory or hub id with the backbone's config, weights and
        tokenizer (and image processor for VLMs). ``config_overrides`` set :class:`MetaEmbedConfig`
        fields, e.g. ``num_query_tokens=16, num_candidate_tokens=64, dim=128``. ``meta_init`` picks the
        Meta Tokens' starting values (see :meth:`init_meta_tokens`); only training reads it, so it is not
        part of the config.
        """
        if meta_init not in META_INITS:
            raise ValueError(f"meta_init must be one of {META_INITS}, got {meta_init!r}")
        if family is None:
            try:
                family = detect_family(name_or_path)
            except OSError as error:
                raise CheckpointError(f"cannot load a backbone config from {str(name_or_path)!r}: {error}") from error
        config = MetaEmbedConfig(backbone_family=family, **config_overrides)
        model = cls._assemble(config, name_or_path, parse_dtype(torch_dtype))
        model.init_meta_tokens(meta_init)
        return model

    def init_meta_tokens(self, how: str) -> None:
        """Set the Meta Tokens' starting values: "normal" keeps the construction's N(0, 0.02²) rows.

        "orthogonal": rows as orthogonal as the width allows (all of them when R_q + R_c ≤ hidden), each
        scaled to the mean L2 norm of the backbone's input-embedding rows. Random 0.02-std rows are
        short next to real token embeddings and start nearly alike; orthogonal rows of a token's length
        give every Meta Token its own direction from the first step.
        """
        if how not in META_INITS:
            raise ValueError(f"meta_init must be one of {META_INITS}, got {how!r}")
        if how == "normal":
            return
        weight = self.meta_tokens.weight
        rows = torch.empty(weight.shape, dtype=torch.float32)
        nn.init.orthogonal_(rows)  # QR in float32: bf16 has no CPU QR
        length = self.backbone.model.get_input_embeddings().weight.detach().float().norm(dim=1).mean()
        with torch.no_grad():
            weight.copy_(F.normalize(rows, dim=1) * length.cpu())

    @classmethod
    def _assemble(cls, config: MetaEmbedConfig, backbone_path: str | Path, dtype: torch.dtype | None):
        adapter = adapter_for(config.backbone_family)
        try:
            backbone = adapter.load(backbone_path, dtype)
            processor = adapter.load_processor(backbone_path, config)
        except MetaEmbedError:
            raise
        except (OSError, ValueError) as error:  # transformers: missing files (OSError), unknown config (ValueError)
            raise CheckpointError(f"cannot load backbone from {str(backbone_path)!r}: {error}") from error
        return cls(config, backbone, processor)

    # ------------------------------------------------------------------------------------------ LoRA
    def add_lora(
        self,
        r: int = 32,
        alpha: int = 32,
        dropout: float = 0.1,
        target_modules: str | list[str] | None = None,
        init_lora_weights: bool | str = "gaussian",
    ) -> None:
        """Inject a LoRA adapter into the backbone (the official recipe: r = α = 32, dropout 0.1).

        Afterwards the wrapped transformers model trains only its adapter; the Meta Tokens, the
        projection and modules the backbone adapter adds itself (the mini projector) stay trainable.
        ``target_modules`` defaults to the family's language-model projections. The adapter is saved
        with the checkpoint (``adapter.safetensors``) next to the unchanged base weights.
        """
        if self.config.lora is not None:
            raise ValueError("this model already has a LoRA adapter")
        targets = target_modules or type(self.backbone).lora_targets
        lora = dict(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets if isinstance(targets, str) else list(targets),
            init_lora_weights=init_lora_weights,
            bias="none",
        )
        self._inject_lora(lora)
        self.config.lora = lora
        for name, parameter in self.backbone.model.named_parameters():  # adapter modules (a projector) stay trainable
            parameter.requires_grad = "lora_" in name

    def _inject_lora(self, lora: dict) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as error:
            raise ImportError("LoRA needs peft: pip install 'metaembed[train]'") from error
        inject_adapter_in_model(LoraConfig(**lora), self.backbone.model)

    # --------------------------------------------------------------------------------------- forward
    @property
    def embedding_dim(self) -> int:
        return self.config.dim if self.config.dim is not None else self.backbone.hidden_size

    @property
    def device(self) -> torch.device:
        return self.meta_tokens.weight.device

    def num_vectors(self, side: Side) -> int:
        """Output vectors per item on ``side`` (R_q / R_c with Meta Tokens; 1 or X for pooling baselines)."""
        return self.config.vectors(side)

    def processor(self, items: Sequence[ItemLike], side: Side) -> dict[str, torch.Tensor]:
        """Tokenise and preprocess a batch, Meta-Token slots appended (the input of :meth:`forward`)."""
        slots = self._slots(side)
        return self.processor_impl(to_items(check_batch(items)), side, slots.count)

    def forward(self, batch: dict[str, torch.Tensor], side: Side) -> torch.Tensor:
        """``(B, R_side, D)`` L2-normalised float32 embeddings; differentiable."""
        slots = self._slots(side)
        batch = {key: value.to(self.device) for key, value in batch.items()}
        meta = self.meta_tokens.weight[slots.rows.start : slots.rows.stop]
        meta = meta.unsqueeze(0).expand(batch["input_ids"].shape[0], -1, -1)
        with_inputs = self.config.slot_values == "states+inputs"
        hidden = self.backbone(batch, meta, with_inputs=with_inputs)
        hidden, inputs = hidden if with_inputs else (hidden, None)
        if self.config.pooling == "meta":
            states = hidden[:, -slots.count :][:, slots.readout]
            if self.meta_residual is not None:  # the content positions are all but the last slots.count
                content, mask = hidden[:, : -slots.count], batch["attention_mask"][:, : -slots.count]
                if inputs is not None:  # token-local features next to the mixed last states
                    content = content + inputs[:, : -slots.count]
                states = self._anchor(states, content, mask, side) + self.meta_residual(states)
        else:
            states = pool_hidden(hidden, batch["attention_mask"], self.config.pooling, self.num_vectors(side))
        if self.projection is not None:
            states = self.projection(states)
        return F.normalize(states.float(), dim=-1)

    def _anchor(self, states: torch.Tensor, content: torch.Tensor, mask: torch.Tensor, side: Side) -> torch.Tensor:
        """What the Meta-Token states are added to: the content mean, or each slot's share of the content."""
        if self.slot_readout is not None:
            return self.slot_readout(states, content, mask, slot_groups(side, states.shape[1]))
        return pool_hidden(content, mask, "mean", 1)

    def _slots(self, side: Side) -> MetaSlots:
        if self.config.pooling != "meta":
            return MetaSlots(rows=range(0), readout=slice(0, 0))
        return meta_slots(side, self.config.meta_layout, self.config.num_query_tokens, self.config.num_candidate_tokens)

    # ---------------------------------------------------------------------------------------- encode
    def encode_queries(self, items: Sequence[ItemLike], budget: Budget | str | None = None, **kwargs) -> torch.Tensor:
        """``(n, r_q, D)`` query embeddings (all R_q vectors without a budget). See :meth:`encode`."""
        return self.encode(items, "query", budget, **kwargs)

    def encode_candidates(
        self, items: Sequence[ItemLike], budget: Budget | str | None = None, **kwargs
    ) -> torch.Tensor:
        """``(n, r_c, D)`` candidate embeddings (all R_c vectors without a budget). See :meth:`encode`."""
        return self.encode(items, "candidate", budget, **kwargs)

    encode_query = encode_queries  # sentence-transformers spelling
    encode_document = encode_candidates

    @torch.inference_mode()
    def encode(
        self,
        items: Sequence[ItemLike],
        side: Side,
        budget: Budget | str | None = None,
        *,
        batch_size: int = 8,
        show_progress_bar: bool | None = None,
    ) -> torch.Tensor:
        """Embed items on one side; the budget only truncates (encoding cost does not depend on it).

        Items are sorted by size so each batch pads little, then returned in input order as a float32
        CPU tensor ``(n, r, D)``. Images are read lazily, one batch at a time.
        """
        items = check_batch(items)
        keep = self.num_vectors(side)
        if budget is not None:
            parsed = Budget.parse(budget).validate(self.num_vectors("query"), self.num_vectors("candidate"))
            keep = parsed.r_q if side == "query" else parsed.r_c
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        order = sorted(range(len(items)), key=lambda i: _rough_size(items[i]))
        out = torch.empty(len(items), keep, self.embedding_dim, dtype=torch.float32)
        starts = range(0, len(items), batch_size)
        show = show_progress_bar if show_progress_bar is not None else (len(starts) > 1 and sys.stderr.isatty())
        was_training = self.training
        self.eval()
        try:
            for start in tqdm(starts, desc=f"encode {side}", disable=not show, unit="batch"):
                index = order[start : start + batch_size]
                batch = self.processor_impl(
                    to_items([items[i] for i in index], offset=start), side, self._slots(side).count
                )
                out[index] = self(batch, side)[:, :keep].cpu()
        finally:
            self.train(was_training)
        return out

    # ------------------------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path, *, quality: dict | None = None) -> Path:
        """Write config.json, model.safetensors (Meta Tokens, projection), backbone/ and a model card.

        The directory is written next to its final place and renamed in, so an interrupted save never
        leaves a half checkpoint; an existing checkpoint there is replaced only once the new one is complete.
        ``quality`` (budget → metric → value) goes into the model card's budget table.
        """
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            self.config.to_json_file(staging / CONFIG_FILE)
            save_file(_cpu(self._head_state()), staging / WEIGHTS_FILE)
            if self.config.lora is not None:
                from peft import get_peft_model_state_dict

                save_file(_cpu(get_peft_model_state_dict(self.backbone.model)), staging / ADAPTER_FILE)
            backbone_dir = staging / self.config.backbone_path
            self.backbone.save_pretrained(backbone_dir)
            self.processor_impl.save_pretrained(backbone_dir)
            (staging / "README.md").write_text(render_model_card(self.config, self.embedding_dim, quality))
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                target.rename(old)
                staging.rename(target)
                shutil.rmtree(old)
            else:
                staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, *, torch_dtype: torch.dtype | str | None = None, device: str | None = None
    ) -> MetaEmbedModel:
        """Load a checkpoint written by :meth:`save_pretrained` from a directory or a hub id."""
        directory = resolve_checkpoint(name_or_path)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for required in (config_path, weights_path):
            if not required.is_file():
                raise CheckpointError(
                    f"{directory} is not a complete metaembed checkpoint: {required.name} is missing "
                    f"(expected {CONFIG_FILE}, {WEIGHTS_FILE} and backbone/)"
                )
        config = MetaEmbedConfig.from_json_file(config_path)
        backbone_dir = directory / config.backbone_path
        if not backbone_dir.is_dir():
            raise CheckpointError(f"{directory}: backbone directory {backbone_dir} is missing")
        model = cls._assemble(config, backbone_dir, parse_dtype(torch_dtype))
        model._load_head(weights_path)
        if config.lora is not None:
            model._load_adapter(directory / ADAPTER_FILE)
        return model.to(device) if device else model

    def _head_state(self) -> dict[str, torch.Tensor]:
        state = {"meta_tokens.weight": self.meta_tokens.weight}
        if self.projection is not None:
            state.update({f"projection.{k}": v for k, v in self.projection.state_dict().items()})
        if self.meta_residual is not None:
            state["meta_residual.weight"] = self.meta_residual.weight
        if self.slot_readout is not None:
            state.update({f"slot_readout.{k}": v for k, v in self.slot_readout.state_dict().items()})
        return state

    def _load_head(self, path: Path) -> None:
        try:
            saved = load_file(path)
        except Exception as error:  # safetensors raises its own error types for truncated/foreign files
            raise CheckpointError(f"cannot read {path}: {error}") from error
        expected = self._head_state()
        if set(saved) != set(expected):
            raise CheckpointError(
                f"{path} holds {sorted(saved)}, expected {sorted(expected)} for this config "
                "(num tokens / dim in config.json must match the weights)"
            )
        for name, tensor in expected.items():
            if saved[name].shape != tensor.shape:
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(saved[name].shape)}, expected {tuple(tensor.shape)}"
                )
            with torch.no_grad():
                tensor.copy_(saved[name].to(tensor.dtype))

    def _load_adapter(self, path: Path) -> None:
        from peft import set_peft_model_state_dict

        if not path.is_file():
            raise CheckpointError(f"config.json names a LoRA adapter but {path} is missing")
        try:
            adapter = load_file(path)
        except Exception as error:  # safetensors raises its own error types for truncated/foreign files
            raise CheckpointError(f"cannot read {path}: {error}") from error
        self._inject_lora(self.config.lora)
        result = set_peft_model_state_dict(self.backbone.model, adapter)
        missing = [key for key in result.missing_keys if "lora_" in key]
        if result.unexpected_keys or missing:
            raise CheckpointError(
                f"{path} does not fit the backbone: unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}"
            )


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}


def _rough_size(value: ItemLike) -> int:
    """A sort key that needs no image decoding: text length, with images after text."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        text = value.get("text")
        return (len(text) if isinstance(text, str) else 0) + (10_000 if value.get("image") is not None else 0)
    return 10_000
