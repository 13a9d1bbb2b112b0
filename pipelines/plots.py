"""Figures logged with every training run: learning curves and the confusion matrix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Train/val loss and val accuracy per epoch from the per-epoch metric dicts."""
    plt = _pyplot()
    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        ax_loss.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h.get("val_acc", float("nan")) for h in history], marker="o", color="tab:green")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("val acc@1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path,
                   title: str = "confusion matrix") -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted) with counts."""
    plt = _pyplot()
    n = len(confusion)
    totals = [max(1, sum(row)) for row in confusion]
    norm = [[v / totals[i] for v in row] for i, row in enumerate(confusion)]
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(class_names))
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(confusion[i][j]), ha="center", va="center", fontsize=7,
                    color="white" if norm[i][j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
