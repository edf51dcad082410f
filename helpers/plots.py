"""Figures the lessons show and save."""

from __future__ import annotations

import textwrap
from typing import Any

import matplotlib.pyplot as plt  # headless runs fall back to the Agg backend by themselves
from matplotlib.figure import Figure


def _finish(fig: Figure) -> Figure:
    """Lay out the figure (notebooks show it; `helpers.steps` saves it with its step)."""
    fig.tight_layout()
    return fig


def token_length_histogram(lengths: list[int], max_length: int) -> Figure:
    """Histogram of tokens per example, with the max_length cut-off marked."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(lengths, bins=30, color="#4C72B0")
    ax.axvline(max_length, color="#C44E52", linestyle="--", label=f"max_length = {max_length}")
    ax.set_xlabel("tokens per example (prompt + answer)")
    ax.set_ylabel("examples")
    ax.set_title("How long are the training examples?")
    ax.legend()
    return _finish(fig)


def loss_curve(history: dict[str, list[tuple[int, float]]], title: str = "") -> Figure:
    """Training loss per logged step, with evaluation loss points on top."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if history["train"]:
        steps, losses = zip(*history["train"], strict=False)
        ax.plot(steps, losses, label="train loss", color="#4C72B0")
    if history["eval"]:
        steps, losses = zip(*history["eval"], strict=False)
        ax.plot(steps, losses, "o--", label="eval loss (held out)", color="#DD8452")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens only)")
    ax.set_title(title or "Loss during training")
    ax.legend()
    ax.grid(alpha=0.3)
    return _finish(fig)


def before_after_bars(values: dict[str, Any], ylabel: str = "eval loss") -> Figure:
    """Bars for a before/after comparison such as eval loss of base vs tuned."""
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    bars = ax.bar(list(values), list(values.values()), color=["#8C8C8C", "#55A868"][: len(values)])
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylabel(ylabel)
    return _finish(fig)


def metric_bars(
    base: dict[str, float],
    tuned: dict[str, float],
    metrics: tuple[str, ...],
    title: str = "",
    labels: dict[str, str] | None = None,
    reference: dict[str, float] | None = None,
) -> Figure:
    """Grouped bars, base vs tuned, one panel per metric (each on its own axis: scales differ).

    `labels`: each panel's title, e.g. with its scale and direction ("loop_rate (share 0-1, lower is better)");
    `reference`: the references' own value where a metric has one (mean_tokens), drawn as a third bar.
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        names, values = ["base", "tuned"], [base[metric], tuned[metric]]
        if reference and metric in reference:
            names, values = [*names, "reference"], [*values, reference[metric]]
        bars = ax.bar(names, values, color=["#8C8C8C", "#55A868", "#4C72B0"][: len(names)])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(textwrap.fill((labels or {}).get(metric, metric), 22), fontsize=9)
        ax.margins(y=0.2)
    fig.suptitle(title or "Generated answers vs references (each panel: its own scale and direction)")
    return _finish(fig)


def subject_bars(per_subject: dict[str, dict[str, float]]) -> Figure:
    """Answer loss per subject, base vs tuned, horizontal bars."""
    subjects = list(per_subject)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(subjects) + 1.2))
    positions = range(len(subjects))
    ax.barh(
        [p + 0.2 for p in positions], [per_subject[s]["base"] for s in subjects], 0.4, label="base", color="#8C8C8C"
    )
    ax.barh(
        [p - 0.2 for p in positions], [per_subject[s]["tuned"] for s in subjects], 0.4, label="tuned", color="#55A868"
    )
    ax.set_yticks(list(positions), [f"{s} ({per_subject[s]['rows']})" for s in subjects])
    ax.set_xlabel("answer loss on held-out rows (lower is better)")
    ax.legend()
    return _finish(fig)


def change_intervals(rows: list[dict[str, Any]]) -> Figure:
    """Each metric's change base -> tuned as a point with its 95% interval, one panel per metric (scales differ).

    `rows` as `helpers.evaluation.changes_table` gives them; green: tuned better, red: worse, grey: can't tell
    (the verdict already knows each metric's direction: a loop rate that falls is green).
    """
    colours = {"yes": "#55A868", "no": "#C44E52"}
    fig, axes = plt.subplots(len(rows), 1, figsize=(6, 0.75 * len(rows) + 0.6), squeeze=False)
    for ax, row in zip(axes[:, 0], rows, strict=True):
        change, low, high = row["change"], row["low"], row["high"]
        # An interval always holds its estimate (helpers.evaluation.paired_bootstrap); max(0, ...) keeps a rounding
        # error in a caller's numbers from reaching matplotlib, which refuses negative error bars.
        xerr = [[max(0.0, change - low)], [max(0.0, high - change)]]
        ax.errorbar([change], [0], xerr=xerr, fmt="o", capsize=4, color=colours.get(row["tuned better"], "#8C8C8C"))
        ax.axvline(0, color="black", linewidth=0.8)
        holm = row.get("tuned better (Holm)", row["tuned better"])
        after = f" (Holm: {holm})" if holm != row["tuned better"] else ""
        ax.set_yticks([0], [f"{row['metric']}: {row['tuned better']}{after}"])
        ax.margins(x=0.3)
    fig.suptitle("Change base -> tuned, paired bootstrap 95% intervals (0 = no change)")
    return _finish(fig)


def horizontal_bars(values: dict[str, float], xlabel: str, title: str) -> Figure:
    """One bar per label (sizes on disk, tokens per second), longest labels readable on the left."""
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.55 * len(values)))
    ax.barh(list(values), list(values.values()), color=["#6a9", "#888", "#48c", "#c84", "#26a"][: len(values)])
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _finish(fig)
