"""Training recipes: a YAML file of five sections, with ``section.key=value`` overrides from the CLI.

A recipe may start from another with a top-level ``base: OTHER.yaml`` and change only some keys.

Relative paths in a recipe are resolved against the current directory. ``model.backbone`` is a
backbone directory or hub id, or a builder: ``tiny:qwen2_vl`` / ``tiny:qwen2_5_vl`` (a tiny random VLM,
for tests) or ``mini`` / ``mini:IMAGE_SIZE`` (MiniLM + MobileNetV2 from pip packages), created under
``train.output_dir``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from metaembed.train.data import DatasetSpec
from metaembed.train.loss import TrainConfigError, variant_pooling
from metaembed.train.strategy import STRATEGIES


@dataclass
class ModelRecipe:
    backbone: str = ""
    init_from: str | None = None  # a metaembed checkpoint to continue from (instead of a fresh model)
    warm_start: str | None = None  # a metaembed model whose LoRA / projector seed a fresh model (Meta Tokens stay new)
    family: str | None = None
    torch_dtype: str | None = None  # weight dtype; keep fp32 weights on CPU and use mixed_precision
    num_query_tokens: int = 16
    num_candidate_tokens: int = 64
    dim: int | None = None
    meta_layout: str = "reference"
    max_text_tokens: int = 1024
    slot_values: str = "states"  # "states+inputs": slots also pool the first layer's input (MetaEmbedConfig)
    lone_slot: str = "mean"  # "attention": a slot alone in its group attends instead of the mean (MetaEmbedConfig)
    meta_anchor: str | None = None  # "mean" | "slots": Meta-Token vectors anchored on the content (MetaEmbedConfig)
    meta_init: str = "normal"  # fresh Meta Tokens: "normal" (std 0.02) | "orthogonal" (rows of token-embedding length)


@dataclass
class LoraRecipe:
    enabled: bool = True  # False: full fine-tuning of the backbone (frozen towers stay frozen)
    r: int = 32
    alpha: int = 32
    dropout: float = 0.1
    target_modules: str | list[str] | None = None  # default: the backbone family's projections
    init_lora_weights: bool | str = "gaussian"


@dataclass
class LossRecipe:
    variant: str = "mmr"  # mmr | nommr | single-last | single-mean | split-X | split-QxC
    groups: list | None = None  # [[r_q, r_c, weight], …]; default from the variant
    temperature: float = 0.03
    normalize_scores: bool = False  # MaxSim / r_q in the loss (the reference's option; see docs/results.md)
    gather: bool = True  # all-gather positives across ranks with gradient
    soft_max_temperature: float | None = None  # τ_s: MaxSim's max → τ_s·logsumexp(s/τ_s) in the loss; null = hard max
    soft_max_anneal_steps: int = 0  # τ_s falls linearly to 0 over this many steps (0: constant)
    diversity_weight: float = 0.0  # λ · mean squared cosine between an item's own vectors (0: off)
    diversity_margin: float = 0.0  # only the part of |cos| above this margin is penalised


@dataclass
class DataRecipe:
    datasets: list[dict] = field(default_factory=list)
    num_negatives: int = 1
    on_bad_record: str = "skip"  # skip (counted warning naming the record) | fail
    batch_by_dataset: bool = False  # every batch from one dataset (drawn by weight) instead of mixed examples


@dataclass
class TrainRecipe:
    output_dir: str = "runs/metaembed"
    max_steps: int = 1000
    batch_size: int = 8  # queries per device per step (each with 1 positive + num_negatives negatives)
    cache_chunk_size: int | None = None  # GradCache: items per forward chunk; None = whole batch at once
    learning_rate: float = 1e-4
    head_learning_rate: float | None = None  # Meta Tokens, projection, mini projector (None: learning_rate)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast; bf16 uses AMX on recent Xeons)
    gradient_checkpointing: bool = False
    strategy: str = "ddp"  # ddp (a model copy per process) | fsdp (decoder layers sharded over processes)
    save_steps: int = 100
    save_total_limit: int | None = 2
    log_steps: int = 10
    seed: int = 42
    threads: int | None = None  # torch CPU threads
    max_minutes: float | None = None  # stop (checkpoint + final model) after this wall time


SECTIONS = {"model": ModelRecipe, "lora": LoraRecipe, "loss": LossRecipe, "data": DataRecipe, "train": TrainRecipe}


@dataclass
class Recipe:
    model: ModelRecipe = field(default_factory=ModelRecipe)
    lora: LoraRecipe = field(default_factory=LoraRecipe)
    loss: LossRecipe = field(default_factory=LossRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)

    def __post_init__(self) -> None:
        if not self.model.backbone and not self.model.init_from:
            raise TrainConfigError(
                "set model.backbone (a backbone directory, hub id, tiny:… or mini) or model.init_from"
            )
        variant_pooling(self.loss.variant)  # validates the variant
        if self.train.mixed_precision in (False, None):  # YAML reads a bare `no` as false
            self.train.mixed_precision = "no"
        if self.train.mixed_precision not in ("no", "bf16", "fp16"):
            raise TrainConfigError(
                f"train.mixed_precision must be no, bf16 or fp16, got {self.train.mixed_precision!r}"
            )
        if self.train.strategy not in STRATEGIES:
            raise TrainConfigError(f"train.strategy must be one of {STRATEGIES}, got {self.train.strategy!r}")
        if self.train.strategy == "fsdp" and self.train.mixed_precision == "fp16":
            raise TrainConfigError(
                "train.mixed_precision=fp16 needs a loss scaler for sharded gradients, which train.strategy=fsdp "
                "does not set up; use bf16"
            )
        for name in ("max_steps", "batch_size", "save_steps", "log_steps"):
            if getattr(self.train, name) < 1:
                raise TrainConfigError(f"train.{name} must be ≥ 1, got {getattr(self.train, name)}")
        if self.train.cache_chunk_size is not None and self.train.cache_chunk_size < 1:
            raise TrainConfigError(f"train.cache_chunk_size must be ≥ 1 or null, got {self.train.cache_chunk_size}")
        if self.data.num_negatives < 0:
            raise TrainConfigError(f"data.num_negatives must be ≥ 0, got {self.data.num_negatives}")
        self.dataset_specs()  # validates every dataset entry

    def dataset_specs(self) -> list[DatasetSpec]:
        specs = []
        known = {f.name for f in fields(DatasetSpec)}
        for i, entry in enumerate(self.data.datasets):
            if not isinstance(entry, dict) or "path" not in entry:
                raise TrainConfigError(f"data.datasets[{i}] must be a mapping with a 'path', got {entry!r}")
            unknown = sorted(set(entry) - known)
            if unknown:
                raise TrainConfigError(f"data.datasets[{i}]: unknown keys {unknown}; allowed: {sorted(known)}")
            specs.append(DatasetSpec(**entry))
        return specs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        if not isinstance(data, dict):
            raise TrainConfigError(f"a recipe is a mapping of sections {sorted(SECTIONS)}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise TrainConfigError(f"unknown recipe sections {unknown}; allowed: {sorted(SECTIONS)}")
        parts = {}
        for name, kind in SECTIONS.items():
            values = data.get(name) or {}
            if not isinstance(values, dict):
                raise TrainConfigError(f"recipe section {name!r} must be a mapping, got {values!r}")
            allowed = {f.name for f in fields(kind)}
            bad = sorted(set(values) - allowed)
            if bad:
                raise TrainConfigError(f"unknown keys {bad} in section {name!r}; allowed: {sorted(allowed)}")
            parts[name] = kind(**{key: _coerce(kind, name, key, value) for key, value in values.items()})
        return cls(**parts)


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe from a YAML file (or the defaults) with ``section.key=value`` overrides (YAML values)."""
    data: dict[str, Any] = read_recipe_file(Path(path)) if path is not None else {}
    for override in overrides:
        apply_override(data, override)
    return Recipe.from_dict(data)


def read_recipe_file(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A recipe file's sections; ``base: OTHER.yaml`` (relative to this file) first reads OTHER, then this
    file's keys replace OTHER's one by one, section by section (a list such as ``data.datasets`` as a whole).

    Why: the 3B / 7B / 32B recipes share the paper's data mixture and loss; each states only what differs.
    """
    if not path.is_file():
        raise TrainConfigError(f"recipe file {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise TrainConfigError(f"recipe {path} names itself as a base (through {[str(p) for p in seen]})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise TrainConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, dict) or "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str):
        raise TrainConfigError(f"{path}: base must be a recipe file name, got {base!r}")
    merged = read_recipe_file(path.parent / base, (*seen, path.resolve()))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def apply_override(data: dict, override: str) -> None:
    """Set ``section.key=value`` (value parsed as YAML: numbers, booleans, null, lists) in ``data``."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise TrainConfigError(f"an override is section.key=value (e.g. train.max_steps=10), got {override!r}")
    section, name = parts
    if section not in SECTIONS:
        raise TrainConfigError(f"override {override!r}: unknown section {section!r}; allowed: {sorted(SECTIONS)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise TrainConfigError(f"override {override!r}: value is not valid YAML: {error}") from error
    data.setdefault(section, {})
    if data[section] is None:
        data[section] = {}
    data[section][name] = value


def _coerce(kind, section: str, key: str, value):
    """YAML reads ``3e-3`` (no dot) as a string: turn strings into the field's int/float type, or say why not."""
    annotation = str(next(f.type for f in fields(kind) if f.name == key))
    if not isinstance(value, str) or not annotation.startswith(("float", "int")):
        return value
    try:
        return float(value) if annotation.startswith("float") else int(value)
    except ValueError:
        raise TrainConfigError(f"{section}.{key} must be a number, got {value!r}") from None
