"""Figures of the plan room: the planner's options with its frontier, and ``auto`` against the fixed ladder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metaembed.plan.planner import Plan


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, out: str | Path) -> Path:
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(target, dpi=120)
    _pyplot().close(figure)
    return target


def plot_plan(plan: Plan, out: str | Path) -> Path:
    """Quality vs p50 latency and vs index bytes: every option grey, the frontier joined, the pick starred."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    frontier = [o for o in plan.options if o.frontier]
    for axis, (x_of, label) in zip(
        axes,
        ((lambda o: o.p50_ms, "p50 scoring latency per query (ms)"), (lambda o: o.index_bytes / 1e9, "index GB")),
        strict=True,
    ):
        for option in plan.options:
            style = {"marker": "o" if option.quality_measured else "x", "color": "0.6", "zorder": 1}
            axis.scatter([x_of(option)], [100 * option.quality], **style)
        line = sorted(frontier, key=x_of)
        axis.plot(
            [x_of(o) for o in line], [100 * o.quality for o in line], "o-", color="C0", label="frontier", zorder=2
        )
        for option in frontier:
            axis.annotate(
                f"{option.setting.budget} {option.setting.dtype}"
                + (" 2-stage" if option.setting.mode == "two-stage" else ""),
                (x_of(option), 100 * option.quality),
                fontsize=7,
                xytext=(4, -10),
                textcoords="offset points",
            )
        pick = plan.recommended
        axis.scatter([x_of(pick)], [100 * pick.quality], marker="*", s=220, color="C3", zorder=3, label="recommended")
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("quality (%)")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    figure.suptitle(f"plan at N = {plan.n:,}, D = {plan.dim}: {plan.target.describe()} (x: quality not measured)")
    return _save(figure, out)


def plot_auto(result: dict[str, Any], out: str | Path, tasks: Sequence[str] | None = None) -> Path:
    """Precision@1 vs mean bytes read and vs mean ms per query: the fixed ladder as a line, ``auto`` as a star;
    one panel pair for the mean over tasks, then one row per task named in ``tasks``."""
    plt = _pyplot()
    rows = [("mean over tasks", result["overall"])]
    by_name = {t["task"]: t["settings"] for t in result["tasks"]}
    rows += [(name, by_name[name]) for name in tasks or []]
    figure, axes = plt.subplots(len(rows), 2, figsize=(11, 3.6 * len(rows)), squeeze=False)
    for (title, settings), pair in zip(rows, axes, strict=True):
        fixed = [name for name in settings if name != "auto"]
        for axis, key, label in zip(
            pair,
            ("mean_bytes", "mean_ms"),
            ("candidate bytes read per query", "scoring ms per query (measured)"),
            strict=True,
        ):
            xs = [settings[name][key] for name in fixed]
            ys = [100 * settings[name]["precision_at_1"] for name in fixed]
            axis.plot(xs, ys, "o-", color="C0", label="fixed budget")
            for name, x, y in zip(fixed, xs, ys, strict=True):
                axis.annotate(name, (x, y), fontsize=7, xytext=(4, -10), textcoords="offset points")
            auto = settings["auto"]
            axis.scatter(
                [auto[key]],
                [100 * auto["precision_at_1"]],
                marker="*",
                s=220,
                color="C3",
                zorder=3,
                label=f"auto ({100 * auto.get('escalated_fraction', 0):.0f} % escalated)",
            )
            axis.set_xscale("log")
            axis.set_xlabel(label)
            axis.set_ylabel("precision@1 (%)")
            axis.set_title(title, fontsize=9)
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=8, loc="lower right")
    return _save(figure, out)
