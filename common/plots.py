"""PNG plots for run folders and comparison reports (matplotlib, no display)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GROUP_COLOURS = {"majority": "#4C72B0", "minority": "#DD8452", None: "#8C8C8C"}


def save_figure(fig, path: Path) -> Path:
    """Write the figure as a PNG and free it (pyplot keeps every open figure alive)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax, xs, values: list, width=0.8, **kwargs) -> None:
    """Bars with a grey "n/a" where a value is missing (a run without that user, a user without pairs): a 0 bar
    would read as a real 0 % or 0 words."""
    ax.bar(xs, [float("nan") if v is None else v for v in values], width, **kwargs)
    for x, v in zip(xs, values):
        if v is None:
            ax.text(x, 0, "n/a", rotation=90, fontsize=6, color="grey", ha="center", va="bottom")


def per_user_accuracy(metrics: dict, path: Path, title: str) -> Path:
    users = sorted(metrics["per_user"], key=natural_key)
    acc = [metrics["per_user"][u]["accuracy"] for u in users]
    colours = [GROUP_COLOURS.get(metrics["per_user"][u]["group"], "#55A868") for u in users]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(users) + 2), 3.5))
    _bars(ax, range(len(users)), acc, color=colours)
    if metrics.get("generic") and metrics["generic"]["accuracy"] is not None:
        ax.axhline(metrics["generic"]["accuracy"], ls="--", color="k", lw=1, label="all pairs as generic user")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(range(len(users)), users, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    return save_figure(fig, path)


def natural_key(label: str):
    """user_2 before user_10; labels in <angle brackets> (generic user, reference) last."""
    parts = [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", label)]
    return (label.startswith("<"), [(0, p) if isinstance(p, int) else (1, p) for p in parts])


def grouped_bars(series: dict[str, dict[str, float]], path: Path, title: str, ylabel: str,
                 ylim: tuple | None = None, hlines: dict[str, float] | None = None) -> Path:
    """series: {run label: {category: value}} drawn as grouped bars per category (natural order);
    hlines: {label: value} drawn as dashed reference lines (e.g. the SFT policy's length)."""
    cats = []
    for s in series.values():
        cats += [c for c in s if c not in cats]
    cats.sort(key=natural_key)
    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(cats) * max(1, n / 2) + 2), 3.8))
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(cats))]
        _bars(ax, xs, [values.get(c) for c in cats], width, label=label, color=f"C{k % 10}")
    for k, (label, value) in enumerate((hlines or {}).items()):
        ax.axhline(value, ls="--", lw=1, color=f"C{(len(series) + k) % 10}", label=label)
    ax.set_xticks(range(len(cats)), cats, rotation=60, ha="right", fontsize=8)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never covers a bar
    return save_figure(fig, path)


def training_curve(history: list[dict], path: Path, title: str, key: str = "loss") -> Path:
    """The training loss per logged step and, where the history has them, the held-out loss of each evaluation
    (`eval/loss`, with the best one marked): the learning curve."""
    fig, ax = plt.subplots(figsize=(5, 3))
    train = [h for h in history if key in h]
    ax.plot([h["step"] for h in train], [h[key] for h in train], marker=".", label=f"train {key}")
    held = [h for h in history if "eval/loss" in h]
    if held:
        ax.plot([h["step"] for h in held], [h["eval/loss"] for h in held], marker="o", label="held-out loss")
        best = min(held, key=lambda h: h["eval/loss"])
        ax.scatter([best["step"]], [best["eval/loss"]], s=80, facecolors="none", edgecolors="k", label="best")
        ax.legend(fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    return save_figure(fig, path)


def per_user_lines(series: dict[str, list[tuple[float, float]]], path: Path, title: str, xlabel: str,
                   ylabel: str) -> Path:
    """series: {user: [(x, y), ...]}, one line per user in natural order (legend only while it stays readable)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for user in sorted(series, key=natural_key):
        pts = series[user]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=user)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) <= 12:
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def win_rate_per_user(per_user: dict[str, dict], path: Path, title: str) -> Path:
    """per_user: winrate.json's rows ({user: {"win_rate", "ci95", "group", ...}}), one bar per user in natural
    order, coloured by group, with its 95% interval and a dashed line at 0.5 (no difference to the baseline)."""
    users = sorted(per_user, key=natural_key)
    rates = [per_user[u]["win_rate"] for u in users]
    colours = [GROUP_COLOURS.get(per_user[u].get("group"), "#55A868") for u in users]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(users) + 2), 3.5))
    _bars(ax, range(len(users)), rates, color=colours)
    for x, u in enumerate(users):
        ci, rate = per_user[u].get("ci95"), per_user[u]["win_rate"]
        if ci and rate is not None:
            ax.errorbar(x, rate, yerr=[[rate - ci[0]], [ci[1] - rate]], fmt="none", ecolor="k", capsize=3, lw=1)
    ax.axhline(0.5, ls="--", color="k", lw=1)
    for group, colour in GROUP_COLOURS.items():  # a legend entry per group present
        if group is not None and any(per_user[u].get("group") == group for u in users):
            ax.bar([0], [0], color=colour, label=group, width=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xticks(range(len(users)), users, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("win rate (ties count half)")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
