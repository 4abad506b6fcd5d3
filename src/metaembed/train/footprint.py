"""Memory per GPU of a LoRA training run under DDP and FSDP, from parameter, gradient, optimizer and activation
sizes — an estimate from the backbone's config numbers, so a user can pick ``train.strategy`` before renting GPUs.

With P parameters in all, T of them trainable (LoRA, Meta Tokens), w bytes per weight, N GPUs and L decoder
layers of P_layer parameters each (the FSDP units; P_root = P − L·P_layer is the root unit: embeddings, vision
tower, final norm, Meta Tokens):

- weights: DDP P·w; FSDP (L·P_layer/N + 2·P_layer + P_root·(1 + 1/N))·w — each GPU's shard of every layer,
  two layers gathered at a time (the running one and the prefetched next), the root gathered for the step;
- gradients: DDP 2·T·w (the gradients and DDP's all-reduce buckets); FSDP T·w/N;
- optimizer: AdamW's two moments in the parameters' dtype, DDP 2·T·w, FSDP 2·T·w/N;
- activations: the same under both: tokens · bytes per token. A step holds the graph of every query and
  candidate of the GPU's batch at once (or of one GradCache chunk, ``train.cache_chunk_size``). Per token,
  with gradient checkpointing, the L layer inputs (L·H·a) plus one layer being recomputed (E) plus the
  gradient in flight (2·H·a); without it, every layer's E. E is counted in :func:`layer_activation_bytes`.

The frozen vision tower runs without a graph and keeps no activations; the MMR scores (B × W·B × 16 × 64
floats) are a few hundred MB at most and left out, as are the CUDA context and allocator slack (add 2–4 GB).
"""

from __future__ import annotations

from dataclasses import dataclass

from metaembed.train.loss import TrainConfigError

GIB = 1024**3
DTYPE_BYTES = {None: 4, "float32": 4, "bfloat16": 2, "float16": 2}
QUERY_TEMPLATE_TOKENS = 20  # <|im_start|>user … Query: … <|im_end|> and 11 pad tokens around a query's content
CANDIDATE_TEMPLATE_TOKENS = 8  # <|im_start|>user … <|im_end|><|endoftext|> around a candidate's content


@dataclass(frozen=True)
class QwenVLShape:
    """The config numbers of a Qwen2.5-VL checkpoint that decide its size (its ``config.json``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vision_depth: int = 32
    vision_hidden: int = 1280
    vision_intermediate: int = 3420
    spatial_merge: int = 2
    patch_size: int = 14
    temporal_patch: int = 2

    @property
    def kv_size(self) -> int:
        return self.hidden_size // self.num_heads * self.num_kv_heads


# From the checkpoints' config.json (text_config / vision_config); written in: no hub access at run time.
QWEN2_5_VL = {
    "Qwen/Qwen2.5-VL-3B-Instruct": QwenVLShape(151936, 2048, 11008, 36, 16, 2),
    "Qwen/Qwen2.5-VL-7B-Instruct": QwenVLShape(152064, 3584, 18944, 28, 28, 4),
    "Qwen/Qwen2.5-VL-32B-Instruct": QwenVLShape(152064, 5120, 27648, 64, 40, 8),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_parameters(shape: QwenVLShape) -> int:
    """One decoder layer: q/k/v (with bias), o, the SwiGLU MLP and two RMSNorms."""
    h, kv, i = shape.hidden_size, shape.kv_size, shape.intermediate_size
    return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h


def vision_parameters(shape: QwenVLShape) -> int:
    """The vision tower: patch embedding, blocks (fused qkv, SwiGLU with biases, RMSNorms) and the merger."""
    v, vi, merged = shape.vision_hidden, shape.vision_intermediate, shape.vision_hidden * shape.spatial_merge**2
    patch = 3 * shape.temporal_patch * shape.patch_size**2 * v
    block = 2 * v + (v * 3 * v + 3 * v) + (v * v + v) + 2 * (v * vi + vi) + (vi * v + v)
    merger = v + (merged * merged + merged) + (merged * shape.hidden_size + shape.hidden_size)
    return patch + shape.vision_depth * block + merger


def backbone_parameters(shape: QwenVLShape) -> int:
    """The backbone as metaembed loads it (``AutoModel``: no language-model head)."""
    text = shape.vocab_size * shape.hidden_size + shape.num_layers * layer_parameters(shape) + shape.hidden_size
    return text + vision_parameters(shape)


def lora_parameters(shape: QwenVLShape, r: int) -> int:
    """LoRA's A (r × in) and B (out × r) on the seven projections of every decoder layer."""
    h, kv, i = shape.hidden_size, shape.kv_size, shape.intermediate_size
    per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    return shape.num_layers * per_layer


def layer_activation_bytes(
    shape: QwenVLShape, activation_bytes: int, lora_r: int, lora_dropout: bool, mask_bytes: int = 1
) -> int:
    """Bytes one token keeps for the backward of one decoder layer with LoRA on frozen weights.

    A frozen projection keeps nothing for its own weight gradient. Kept: each RMSNorm's fp32 input and its
    inverse root (2 × (4H + 4)); attention's q, k, v, output (2H + 2·kv) and log-sum-exp (4 per head); the
    MLP's gate, SiLU(gate) and up outputs (3I); the LoRA A outputs (7r); and the inputs of the LoRA A
    matrices: without dropout the two normed states and the MLP product (2H + I; the o-projection's input is
    the attention output, already kept), with dropout each of the seven targets' own dropped-out copy and
    its mask ((6H + I) · (a + mask_bytes); CUDA keeps a 1-byte mask, the CPU one of the activation's dtype).
    """
    a, h, kv, i = activation_bytes, shape.hidden_size, shape.kv_size, shape.intermediate_size
    norms = 2 * (4 * h + 4)
    attention = (2 * h + 2 * kv) * a + 4 * shape.num_heads
    mlp = 3 * i * a
    lora_inputs = (6 * h + i) * (a + mask_bytes) if lora_dropout else (2 * h + i) * a
    return norms + attention + mlp + 7 * lora_r * a + lora_inputs


@dataclass(frozen=True)
class Footprint:
    """Bytes per GPU of one training step's peak, by kind."""

    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass(frozen=True)
class RunShape:
    """What besides the backbone decides the memory: from a recipe (:meth:`from_recipe`) and an item length."""

    shape: QwenVLShape
    lora_r: int
    lora_dropout: bool
    weight_bytes: int
    activation_bytes: int
    batch_size: int
    num_negatives: int
    query_tokens: int  # whole sequence: template, content, Meta Tokens
    candidate_tokens: int
    gradient_checkpointing: bool
    cache_chunk_size: int | None
    meta_tokens: int

    @classmethod
    def from_recipe(cls, recipe, content_tokens: int) -> RunShape:
        """``content_tokens``: text plus visual tokens of a typical item (an image of p pixels is p / 28² tokens)."""
        m = recipe.model
        if m.backbone not in QWEN2_5_VL:
            raise TrainConfigError(f"no config numbers for {m.backbone!r}; known: {sorted(QWEN2_5_VL)}")
        if not recipe.lora.enabled:
            raise TrainConfigError("the memory estimate covers LoRA runs (lora.enabled: true)")
        weight = DTYPE_BYTES[m.torch_dtype]
        meta = m.num_query_tokens + m.num_candidate_tokens
        appended = {"query": meta, "candidate": meta}  # "reference": every input carries all Meta Tokens
        if m.meta_layout == "own":
            appended = {"query": m.num_query_tokens, "candidate": m.num_candidate_tokens}
        return cls(
            shape=QWEN2_5_VL[m.backbone],
            lora_r=recipe.lora.r,
            lora_dropout=recipe.lora.dropout > 0,
            weight_bytes=weight,
            activation_bytes=2 if recipe.train.mixed_precision == "bf16" else weight,
            batch_size=recipe.train.batch_size,
            num_negatives=recipe.data.num_negatives,
            query_tokens=QUERY_TEMPLATE_TOKENS + content_tokens + appended["query"],
            candidate_tokens=CANDIDATE_TEMPLATE_TOKENS + content_tokens + appended["candidate"],
            gradient_checkpointing=recipe.train.gradient_checkpointing,
            cache_chunk_size=recipe.train.cache_chunk_size,
            meta_tokens=meta,
        )

    def step_tokens(self) -> int:
        """Tokens whose graph one GPU holds at once: the whole batch, or GradCache's largest chunk."""
        candidates = self.batch_size * (1 + self.num_negatives)
        if self.cache_chunk_size:
            return min(self.cache_chunk_size, max(self.batch_size, candidates)) * self.candidate_tokens
        return self.batch_size * self.query_tokens + candidates * self.candidate_tokens


def estimate(run: RunShape, strategy: str, gpus: int) -> Footprint:
    """Peak bytes per GPU of ``run`` under ``strategy`` ("ddp" | "fsdp") on ``gpus`` GPUs (formulas above)."""
    s, w = run.shape, run.weight_bytes
    layer = layer_parameters(s) + lora_parameters(s, run.lora_r) // s.num_layers
    trainable = lora_parameters(s, run.lora_r) + run.meta_tokens * s.hidden_size
    total = backbone_parameters(s) + trainable
    root = total - s.num_layers * layer
    if strategy == "ddp":
        weights, gradients, optimizer = total * w, 2 * trainable * w, 2 * trainable * w
    elif strategy == "fsdp":
        weights = (s.num_layers * layer // gpus + 2 * layer + root + root // gpus) * w
        gradients, optimizer = trainable * w // gpus, 2 * trainable * w // gpus
    else:
        raise TrainConfigError(f"strategy must be ddp or fsdp, got {strategy!r}")
    a, h = run.activation_bytes, s.hidden_size
    per_layer = layer_activation_bytes(s, a, run.lora_r, run.lora_dropout)
    if run.gradient_checkpointing:
        per_token = s.num_layers * h * a + per_layer + 2 * h * a
    else:
        per_token = s.num_layers * per_layer + 2 * h * a
    return Footprint(weights, gradients, optimizer, run.step_tokens() * per_token)
