"""The training figure of the CondenseNet example: loss and accuracy over epochs, with the learning
rate and the condensing stage boundaries marked (as the paper's training curves)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def plot_history(
    history: Sequence[dict[str, Any]], drops: Sequence[dict[str, Any]], path: Path, title: str
) -> Path:
    """Write the figure to ``path`` (PNG). ``drops`` are the condensing events ``{"epoch", "stage"}``."""
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, acc_axis) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    loss_axis.plot(epochs, [r["train_loss"] for r in history], "o-", ms=3, label="train loss")
    loss_axis.plot(epochs, [r["test_loss"] for r in history], "s-", ms=3, label="test loss")
    loss_axis.set_ylabel("cross-entropy loss")
    acc_axis.plot(epochs, [100 * r["train_acc"] for r in history], "o-", ms=3, label="train accuracy")
    acc_axis.plot(epochs, [100 * r["test_acc"] for r in history], "s-", ms=3, label="test accuracy")
    acc_axis.set_ylabel("accuracy (%)")
    acc_axis.set_xlabel("epoch")
    lr_axis = loss_axis.twinx()
    lr_axis.plot(epochs, [r["lr"] for r in history], ":", color="grey", label="learning rate (epoch end)")
    lr_axis.set_ylabel("learning rate", color="grey")
    lr_axis.set_ylim(bottom=0)
    if drops:
        end = max(d["epoch"] for d in drops)
        for axis in (loss_axis, acc_axis):
            axis.axvspan(0, end, color="tab:orange", alpha=0.08, lw=0)
            for drop in drops:
                axis.axvline(drop["epoch"], color="tab:red", ls="--", lw=0.8)
        labels: dict[float, list[str]] = {}
        for drop in drops:  # drops at the same step share one label
            labels.setdefault(drop["epoch"], []).append(drop["stage"])
        for where, stages in labels.items():
            acc_axis.annotate(
                " + ".join(stages),
                (where, 0.02),
                xycoords=("data", "axes fraction"),
                rotation=90,
                fontsize=7,
                color="tab:red",
                ha="right",
            )
        loss_axis.text(
            end / 2, 0.97, "condensing", transform=loss_axis.get_xaxis_transform(), ha="center", va="top"
        )
        if epochs and epochs[-1] > end:
            loss_axis.text(
                (end + epochs[-1]) / 2,
                0.97,
                "optimization",
                transform=loss_axis.get_xaxis_transform(),
                ha="center",
                va="top",
            )
    handles = loss_axis.get_legend_handles_labels()[0] + lr_axis.get_legend_handles_labels()[0]
    loss_axis.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    acc_axis.legend(loc="lower right", fontsize=8)
    for axis in (loss_axis, acc_axis):
        axis.grid(alpha=0.3)
    loss_axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
