"""Figures shared by several stages (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def confusion_figure(confusion: torch.Tensor, labels: Sequence[str], title: str = ""):
    """A row-normalised confusion matrix (rows: true class, columns: predicted) with counts."""
    counts = confusion.float()
    rates = counts / counts.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            n = int(counts[i, j])
            if n:
                ax.text(j, i, str(n), ha="center", va="center",
                        color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    acc = counts.diag().sum() / counts.sum().clamp_min(1)
    ax.set_title(f"{title}  accuracy {acc:.1%}".strip())
    fig.tight_layout()
    return fig
