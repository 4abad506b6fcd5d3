"""The model card (README.md) written next to every checkpoint, with its budget table."""

from __future__ import annotations

import os
from pathlib import Path

from metaembed.budget import Budget
from metaembed.model.config import MetaEmbedConfig

FAMILY_NOTES = {  # what a checkpoint's users must know about its base model, e.g. its licence
    "gemma-mini": "Built on Google's Gemma 3 270M. Gemma is provided under and subject to the Gemma Terms of Use "
    "found at https://ai.google.dev/gemma/terms (see backbone/NOTICE).",
}
ANCHOR_NOTES = {
    "mean": ", each anchored on the content mean (`meta_anchor: mean`)",
    "slots": ", each anchored on its share of the content within its budget group (`meta_anchor: slots`)",
}


def render_model_card(config: MetaEmbedConfig, embedding_dim: int, quality: dict | None = None) -> str:
    """Markdown: what the model is, how to load it, and per budget its bytes, FLOPs and quality."""
    metrics = sorted({name for row in (quality or {}).values() for name in row})
    header = ["budget", "bf16 bytes / candidate", "FLOPs / (query, candidate)", *metrics]
    lines = [
        "---",
        "library_name: metaembed",
        "tags: [metaembed, multi-vector, late-interaction, matryoshka, retrieval]",
        "---",
        "# MetaEmbed checkpoint",
        "",
        f"Backbone family `{config.backbone_family}`; {_readout(config)}; {embedding_dim}-d vectors; layout "
        f"`{config.meta_layout}`. Pick a budget `(r_q, r_c)` at serve time: the first r_q query and first "
        "r_c candidate vectors take part in MaxSim.",
        "",
        *([FAMILY_NOTES[config.backbone_family], ""] if config.backbone_family in FAMILY_NOTES else []),
        "```python",
        "from metaembed import MetaEmbedModel, maxsim",
        "",
        'model = MetaEmbedModel.from_pretrained("<this directory or hub id>")',
        'scores = maxsim(model.encode_queries(["..."]), model.encode_candidates(["..."]), budget="4x8")',
        "```",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for budget in Budget.LADDER:
        if budget.r_q > config.vectors("query") or budget.r_c > config.vectors("candidate"):
            continue
        row = [
            str(budget),
            f"{budget.index_bytes(1, embedding_dim, 2):,}",
            f"{budget.flops(1, embedding_dim):,}",
            *(_fmt((quality or {}).get(str(budget), {}).get(name)) for name in metrics),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _readout(config: MetaEmbedConfig) -> str:
    if config.pooling == "meta":
        anchor = ANCHOR_NOTES.get(config.meta_anchor, "")
        if config.lone_slot == "attention":
            anchor += "; a slot alone in its group attends over the content (`lone_slot: attention`)"
        return f"{config.num_query_tokens} query and {config.num_candidate_tokens} candidate Meta Tokens{anchor}"
    return (
        f"baseline pooling `{config.pooling}` ({config.vectors('query')} query and "
        f"{config.vectors('candidate')} candidate vectors, no Meta Tokens)"
    )


def read_quality(directory: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """The measured quality per budget from a checkpoint's model card: ``{"4x8": {"test-split P@1": 0.11}}``.

    The card's budget table is the only place a checkpoint records it; columns after bytes and FLOPs are
    metrics. A checkpoint without a card, or whose table has no metric columns, gives ``{}``.
    """
    card = Path(directory) / "README.md"
    if not card.is_file():
        return {}
    rows = [line.strip() for line in card.read_text(encoding="utf-8").splitlines() if line.strip().startswith("|")]
    if not rows or not rows[0].startswith("| budget |"):
        return {}
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    metrics = header[3:]
    quality: dict[str, dict[str, float]] = {}
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        values = {}
        for name, cell in zip(metrics, cells[3:], strict=False):
            try:
                values[name] = float(cell.replace(",", ""))
            except ValueError:
                continue  # "–": not measured at this budget
        if values:
            quality[cells[0]] = values
    return quality
