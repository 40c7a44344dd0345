"""Metrics to JSON lines, and the loss/accuracy plot drawn from them."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per line; a no-op without a path."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def reset(self) -> None:
        """Start a fresh log (a new run in an old folder must not mix with its records)."""
        if self.path is not None and self.path.exists():
            self.path.unlink()

    def truncate(self, global_step: int) -> None:
        """Keep only records up to ``global_step`` (a resumed run redoes what came after)."""
        if self.path is None or not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r.get("global_step", 0) <= global_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_history(metrics_path: Path | None, out_path: Path, title: str = "training") -> Path | None:
    """Training loss per logged step and dev accuracy per epoch, side by side."""
    if metrics_path is None or not Path(metrics_path).exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch" and "dev_acc" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        ax_loss.plot([r["global_step"] for r in train], [r["loss"] for r in train], lw=1.2)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    if epochs:
        ax_acc.plot([r["global_step"] for r in epochs], [r["dev_acc"] for r in epochs], marker="o")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("dev accuracy")
    ax_acc.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
