"""Our model as an mteb encoder: late interaction, MaxSim similarity, one budget per wrapper.

``encode`` returns dense ``(n, r, D)`` tensors — the first ``r_q`` vectors for queries, the first ``r_c``
for documents — and ``similarity`` is the budgeted MaxSim sum (:func:`metaembed.scoring.maxsim`), so
mteb's retrieval tasks (ViDoRe v1/v2/v3, MIEB any-to-any retrieval, text retrieval) run unchanged::

    import mteb
    from metaembed.eval.mteb_adapter import MetaEmbedMTEB

    model = MetaEmbedMTEB("path/to/checkpoint", budget="16x64")
    mteb.evaluate(model, mteb.get_benchmark("ViDoRe(v2)"))

Queries are the items mteb encodes with ``prompt_type=query``; everything else (documents, and tasks
without a prompt type) is encoded on the candidate side.

Tasks whose evaluator needs **one vector per item** (classification, clustering, STS, pair
classification, regression, summarization, zero-shot classification: scikit-learn or cosine on 2-D
arrays) cannot take multi-vector embeddings — they fail for ColPali in mteb. For those task types the
adapter returns the mean of the budget's vectors, re-normalised (``single_vector="mean"``, the default),
and scores 2-D embeddings by cosine; this pooled mode is our extension, not the paper's protocol. Pass
``single_vector=None`` to make such tasks fail with a clear error instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from metaembed.budget import Budget
from metaembed.errors import InputError, ShapeError
from metaembed.scoring import maxsim

MULTI_VECTOR_TASK_TYPES = frozenset({
    "Retrieval", "Reranking", "InstructionRetrieval", "InstructionReranking", "Any2AnyRetrieval",
    "Any2AnyMultilingualRetrieval", "BitextMining", "VisionCentricQA", "Compositionality", "DocumentUnderstanding",
})  # fmt: skip
"""mteb task types whose evaluators call ``similarity`` (MaxSim) and so take ``(n, R, D)`` embeddings."""

if TYPE_CHECKING:
    from metaembed.model import MetaEmbedModel


class MetaEmbedMTEB(AbsEncoder):
    """An mteb ``EncoderProtocol`` around a :class:`~metaembed.MetaEmbedModel` at one budget."""

    def __init__(
        self,
        model: MetaEmbedModel | str,
        budget: Budget | str | None = None,
        *,
        name: str | None = None,
        revision: str | None = None,
        device: str | None = None,
        batch_size: int = 8,
        single_vector: str | None = "mean",
        **kwargs: Any,
    ) -> None:
        if single_vector not in ("mean", None):
            raise InputError(f"single_vector must be 'mean' or None, got {single_vector!r}")
        self.single_vector = single_vector
        if isinstance(model, str):
            from metaembed.model import MetaEmbedModel

            source = model
            model = MetaEmbedModel.from_pretrained(model, device=device, **kwargs)
            name = name or source
        self.model = model
        full = Budget(model.num_vectors("query"), model.num_vectors("candidate"))
        self.budget = Budget.parse(budget).validate(full.r_q, full.r_c) if budget is not None else full
        self.batch_size = batch_size
        label = name or "metaembed/local"
        if "/" not in label:
            label = f"metaembed/{label}"
        self.mteb_model_meta = ModelMeta(
            loader=None,
            name=f"{label}@{self.budget}",
            revision=revision,
            release_date=None,
            languages=None,
            n_parameters=sum(p.numel() for p in model.parameters()),
            memory_usage_mb=None,
            max_tokens=None,
            embed_dim=model.embedding_dim,
            license=None,
            open_weights=True,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch"],
            similarity_fn_name=ScoringFunction.MAX_SIM,
            use_instructions=True,
            training_datasets=None,
            modalities=["image", "text"],
            model_type=["late-interaction"],
        )

    def encode(
        self,
        inputs: Iterable[dict[str, Any]],
        *,
        task_metadata: Any = None,
        hf_split: str | None = None,
        hf_subset: str | None = None,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``(n, r_q, D)`` for queries, ``(n, r_c, D)`` otherwise (``(n, D)`` pooled for single-vector tasks)."""
        task_type = getattr(task_metadata, "type", None)
        multi = task_type is None or task_type in MULTI_VECTOR_TASK_TYPES
        if not multi and self.single_vector is None:
            raise InputError(f"task type {task_type!r} needs one vector per item; this wrapper was built with "
                             "single_vector=None (use 'mean' to pool the budget's vectors)")  # fmt: skip
        items = [item for batch in inputs for item in _batch_items(batch)]
        if not items:
            raise InputError("mteb passed no inputs to encode")
        query = prompt_type == PromptType.query
        side = "query" if query else "candidate"
        keep = self.budget.r_q if query else self.budget.r_c
        batch_size = int(kwargs.get("batch_size") or self.batch_size)
        vectors = self.model.encode(items, side, batch_size=batch_size)[:, :keep]
        if multi:
            return vectors
        return torch.nn.functional.normalize(vectors.mean(dim=1), dim=-1)

    def similarity(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """Budgeted MaxSim of every row of ``embeddings1`` (queries) against every row of ``embeddings2``.

        Pooled ``(n, D)`` embeddings (single-vector tasks) are compared by cosine.
        """
        a, b = _pair(embeddings1, embeddings2)
        if a.ndim == 2:
            return _normalise(a) @ _normalise(b).T
        return maxsim(a, b)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """MaxSim (or cosine for pooled embeddings) of each pair ``(embeddings1[i], embeddings2[i])``."""
        a, b = _pair(embeddings1, embeddings2)
        if a.shape[0] != b.shape[0]:
            raise ShapeError(f"pairwise similarity needs equal counts, got {a.shape[0]} and {b.shape[0]}")
        if a.ndim == 2:
            return (_normalise(a) * _normalise(b)).sum(dim=-1)
        return torch.einsum("nid,njd->nij", a, b).amax(dim=2).sum(dim=1)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _pair(embeddings1: Any, embeddings2: Any) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _tensor(embeddings1, "embeddings1"), _tensor(embeddings2, "embeddings2")
    if a.ndim != b.ndim or a.shape[-1] != b.shape[-1]:
        raise ShapeError(f"cannot compare embeddings of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def _tensor(value: Any, name: str) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if tensor.ndim == 1:  # one pooled embedding ([embedding_dim]-shaped, as the mteb protocol allows)
        tensor = tensor.unsqueeze(0)
    if tensor.ndim not in (2, 3):
        raise ShapeError(f"{name} must be (n, R, D) multi-vector or (n, D) pooled embeddings, "
                         f"got shape {tuple(tensor.shape)}")  # fmt: skip
    return tensor.float()


def _batch_items(batch: dict[str, Any]) -> list[dict[str, Any]]:
    texts, images = batch.get("text"), batch.get("image")
    if texts is None and images is None:
        raise InputError(f"an mteb batch without 'text' or 'image' (keys: {sorted(batch)}); this model reads both")
    count = len(texts if texts is not None else images)
    out = []
    for i in range(count):
        text = texts[i] if texts is not None else None
        image = _pil(images[i]) if images is not None else None
        out.append({"text": text if text else None, "image": image} if image is not None else {"text": text})
    return out


def _pil(image: Any):
    from PIL import Image

    if image is None or isinstance(image, Image.Image):
        return image
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) → (H, W, C)
    if array.dtype != np.uint8:
        array = np.clip(array * (255 if array.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
