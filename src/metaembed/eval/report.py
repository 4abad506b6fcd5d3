"""Evaluation results: one JSON schema for both benchmarks, markdown tables, and budget plots.

A result file holds the model, the dataset ids and revisions, and one ``{task, budget, metric, value}``
row per measured number, plus the group means (MMEB categories, IND / OOD, overall). Values are
fractions in [0, 1]; tables and plots show percentages. Several result files (MMR, NoMMR,
single-vector with its one ``1x1`` budget) overlay in one plot: score vs budget and score vs index bytes
per item (``r_c · D · bytes_per_value``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from metaembed.budget import Budget
from metaembed.errors import EvalError

SCHEMA_VERSION = 1


class ReportError(EvalError):
    """A result file that is missing, unreadable or not a metaembed evaluation result."""


def machine_state() -> dict:
    """What a run was measured on: CPU, cores, torch threads, load average, the scoring kernel."""
    import platform

    import torch

    from metaembed import fused

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "fused_kernel": fused.status(),
    }


@dataclass
class EvalResult:
    """Everything one evaluation run measured; ``to_json`` / ``load`` round-trip it."""

    benchmark: str
    model: dict
    main_metric: str
    budgets: list[str]
    embedding_dim: int
    datasets: list[dict] = field(default_factory=list)
    scores: list[dict] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)
    encodes: dict = field(default_factory=dict)
    bytes_per_value: float = 2.0
    # the machine when the run started and when it ended (machine_state): threads, load, the scoring kernel
    machine_before: dict = field(default_factory=dict)
    machine_after: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    metaembed_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not self.metaembed_version:
            from metaembed import __version__

            self.metaembed_version = __version__

    # --------------------------------------------------------------------------------------- lookup
    def value(self, task: str, budget: str | Budget, metric: str | None = None) -> float:
        """The measured value of ``metric`` (default: the main metric) on ``task`` at ``budget``."""
        return _find(self.scores, "task", task, str(budget), metric or self.main_metric)

    def group_value(self, group: str, budget: str | Budget, metric: str | None = None) -> float:
        """A group mean: ``overall``, ``IND``, ``OOD`` or a category name."""
        return _find(self.groups, "group", group, str(budget), metric or self.main_metric)

    @property
    def task_names(self) -> list[str]:
        return [d["name"] for d in self.datasets]

    @property
    def group_names(self) -> list[str]:
        return list(dict.fromkeys(g["group"] for g in self.groups))

    def bytes_per_item(self, budget: str | Budget) -> float:
        """Index bytes one candidate takes at ``budget``: r_c · D · bytes_per_value."""
        return Budget.parse(budget).r_c * self.embedding_dim * self.bytes_per_value

    @property
    def label(self) -> str:
        return str(self.model.get("label") or self.model.get("name") or "model")

    # ----------------------------------------------------------------------------------------- json
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | Path) -> Path:
        """Write the result atomically (a temporary file renamed into place)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        path = Path(path)
        if not path.is_file():
            raise ReportError(f"result file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ReportError(f"cannot read {path} as JSON: {error}") from error
        required = {"benchmark", "model", "main_metric", "budgets", "embedding_dim", "scores"}
        if not isinstance(data, dict) or not required <= set(data):
            missing = sorted(required - set(data)) if isinstance(data, dict) else sorted(required)
            raise ReportError(f"{path} is not a metaembed eval result: missing {missing}")
        known = set(cls.__dataclass_fields__)
        result = cls(**{key: value for key, value in data.items() if key in known})
        result.main_metric = _one_spelling(result.main_metric)
        for row in (*result.scores, *result.groups):
            row["metric"] = _one_spelling(row["metric"])
        return result

    # ------------------------------------------------------------------------------------- markdown
    def markdown(self, digits: int = 1) -> str:
        """Group table (budgets × groups) and per-task table (tasks × budgets), values in %."""
        metric = self.main_metric
        lines = [
            f"### {self.benchmark.upper()} — {self.label} — {metric} (%)",
            "",
        ]
        groups = self.group_names
        if groups:
            lines += [
                "| budget | bytes/item | " + " | ".join(groups) + " |",
                "|---|---|" + "---|" * len(groups),
            ]
            for budget in self.budgets:
                cells = [_pct(self.group_value(g, budget), digits) for g in groups]
                lines.append(f"| {budget} | {self.bytes_per_item(budget):,.0f} | " + " | ".join(cells) + " |")
            lines.append("")
        header = ["task", "category", "split", "queries"] if self.benchmark == "mmeb" else ["task", "queries"]
        lines += ["| " + " | ".join(header + self.budgets) + " |", "|" + "---|" * (len(header) + len(self.budgets))]
        for dataset in self.datasets:
            meta = [dataset["name"]]
            if self.benchmark == "mmeb":
                meta += [dataset.get("category", ""), dataset.get("split", "")]
            meta.append(str(dataset.get("num_queries", "")))
            cells = [_pct(self.value(dataset["name"], b), digits) for b in self.budgets]
            lines.append("| " + " | ".join(meta + cells) + " |")
        return "\n".join(lines) + "\n"


def write_json_atomic(path: str | Path, data: object) -> Path:
    """Write JSON to a temporary file beside ``path`` and rename it in: never a half-written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=2)
            stream.write("\n")
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return target


def _find(rows: list[dict], key: str, name: str, budget: str, metric: str) -> float:
    for row in rows:
        if row[key] == name and row["budget"] == budget and row["metric"] == metric:
            return float(row["value"])
    raise ReportError(f"no {metric} for {key} {name!r} at budget {budget} in this result")


def _one_spelling(metric: str) -> str:
    """``ndcg@5`` (trec spelling) read as ``ndcg_at_5``, the spelling results are written in."""
    if "@" not in metric:
        return metric
    from metaembed.eval.metrics import canonical_measure

    return canonical_measure(metric)


def _pct(value: float, digits: int) -> str:
    return f"{100 * value:.{digits}f}"


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ReportError("cannot average an empty group")
    return float(sum(values) / len(values))


# ------------------------------------------------------------------------------------------- plots
def plot_results(
    results: Sequence[EvalResult | str | Path],
    out: str | Path,
    *,
    group: str = "overall",
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Two panels: score vs budget, and score vs index bytes per item (log scale), one line per result.

    A result with a single budget (a single-vector model at ``1x1``) is drawn as a marker with a dashed
    horizontal reference line across the panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = [r if isinstance(r, EvalResult) else EvalResult.load(r) for r in results]
    if not loaded:
        raise ReportError("plot needs at least one result")
    if labels is not None and len(labels) != len(loaded):
        raise ReportError(f"{len(labels)} labels for {len(loaded)} results")
    names = list(labels) if labels is not None else _unique_labels(loaded, results)
    metrics = {r.main_metric for r in loaded}
    budgets = sorted({Budget.parse(b) for r in loaded for b in r.budgets}, key=lambda b: (b.r_c, b.r_q))
    position = {str(b): i for i, b in enumerate(budgets)}

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for result, name in zip(loaded, names, strict=True):
        if group not in result.group_names:
            raise ReportError(f"result {name!r} has no group {group!r}; it has {result.group_names}")
        xs = [position[str(Budget.parse(b))] for b in result.budgets]
        ys = [100 * result.group_value(group, b) for b in result.budgets]
        sizes = [result.bytes_per_item(b) for b in result.budgets]
        (line,) = left.plot(xs, ys, marker="o", label=name)
        right.plot(sizes, ys, marker="o", color=line.get_color(), label=name)
        if len(result.budgets) == 1:
            left.axhline(ys[0], color=line.get_color(), linestyle="--", linewidth=1)
            right.axhline(ys[0], color=line.get_color(), linestyle="--", linewidth=1)
    metric = " / ".join(sorted(metrics))
    left.set_xticks(range(len(budgets)), [f"({b.r_q},{b.r_c})" for b in budgets])
    left.set_xlabel("budget (r_q, r_c)")
    left.set_ylabel(f"{group} {metric} (%)")
    right.set_xscale("log", base=2)
    right.set_xlabel("index bytes per item (r_c · D · bytes/value)")
    right.set_ylabel(f"{group} {metric} (%)")
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title or f"{'/'.join(sorted({r.benchmark for r in loaded})).upper()}: {group} {metric}")
    figure.tight_layout()
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target


def _unique_labels(loaded: Sequence[EvalResult], sources: Sequence) -> list[str]:
    labels = [r.label for r in loaded]
    if len(set(labels)) == len(labels):
        return labels
    return [
        f"{label} ({Path(str(s)).parent.name}/{Path(str(s)).stem})"
        if not isinstance(s, EvalResult)
        else f"{label} #{i}"
        for i, (label, s) in enumerate(zip(labels, sources, strict=True))
    ]
