"""Feature-distance analysis (GKD appendix A.2, figs. 4-5) as a callback on the one loop.

While any method trains, :class:`DistanceRecorder` measures every ``every`` steps, per
uniformly mapped layer pair, the distance between the student's and the teacher's hidden
states, Q, K, V and attention scores, and between their logits: MSE and KL_T for
T in {1, 5, 10, 15, 20} (KL over the last dim, features read as logits), on the raw features
when their shapes agree and on their relation form ``X X^T / sqrt(d)`` always. With each
record it stores the training loss and the student's accuracy on a small dev sample.
:func:`correlate` then gives the Spearman and Pearson correlation of every distance series
against the loss and the dev metric, and :func:`plot_heatmap` draws them as a heat-map.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch

from .atomic import write_json
from .engine.callbacks import Callback
from .engine.hooks import FeatureExtractor
from .engine.layer_maps import map_layers
from .engine.losses import kl, mse
from .engine.relations import gram

KINDS = ("hidden", "query", "key", "value", "attention_scores")
TEMPERATURES = (1, 5, 10, 15, 20)


def feature_distances(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> dict[str, float]:
    """MSE and KL_T between two features, raw (equal shapes) and as relations."""
    out: dict[str, float] = {}
    forms = {"rel": (gram(s, mask=mask), gram(t, mask=mask))}
    if s.shape == t.shape:
        forms["raw"] = (s.float(), t.float())
    for form, (a, b) in forms.items():
        if torch.finfo(torch.float32).min in (a.min(), b.min()):  # masked scores: read as logits only
            a, b = a.clamp_min(-1e4), b.clamp_min(-1e4)
        out[f"{form}/mse"] = float(mse(a, b))
        for tau in TEMPERATURES:
            out[f"{form}/kl{tau}"] = float(kl(a, b, temperature=tau))
    return out


class DistanceRecorder(Callback):
    """Records distances, loss and dev accuracy every ``every`` steps (teacher = the step's)."""

    def __init__(self, teacher: torch.nn.Module, dev_batches: Iterable[dict] | None = None, every: int = 10):
        self.teacher = teacher
        self.dev = list(dev_batches or [])
        self.every = max(1, every)
        self.records: list[dict] = []
        self._s: FeatureExtractor | None = None
        self._t: FeatureExtractor | None = None
        self.pairs: list[tuple[int, int]] = []

    def _setup(self, student) -> None:
        self._s, self._t = FeatureExtractor(student), FeatureExtractor(self.teacher)
        ls, lt = self._s.adapter.geometry.num_layers, self._t.adapter.geometry.num_layers
        self.pairs = map_layers("uniform", ls, lt)
        self._s.set_features([f"{k}:{s}" for s, _ in self.pairs for k in KINDS])
        self._t.set_features([f"{k}:{t}" for _, t in self.pairs for k in KINDS])

    @torch.no_grad()
    def on_step_end(self, trainer, ctx, batch, losses) -> None:
        if ctx.global_step % self.every:
            return
        if self._s is None:
            self._setup(trainer.student)
        was = trainer.student.training
        trainer.student.eval()
        sf, tf = self._s(batch), self._t(batch)
        mask = batch.get("attention_mask")
        record = {"step": ctx.global_step, "loss": float(losses["loss"])}
        for s, t in self.pairs:
            for kind in KINDS:
                for k, v in feature_distances(sf[f"{kind}:{s}"], tf[f"{kind}:{t}"], mask).items():
                    record[f"{kind}:s{s}-t{t}/{k}"] = v
        for k, v in feature_distances(sf["logits"][:, None], tf["logits"][:, None], None).items():
            if k.startswith("raw"):
                record[f"logits/{k}"] = v
        if self.dev:
            correct = total = 0
            for b in self.dev:
                b = {k: v.to(trainer.device) for k, v in b.items()}
                out = trainer.student(**{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b})
                correct += int((out.logits.argmax(-1) == b["labels"]).sum())
                total += int(b["labels"].numel())
            record["dev_acc"] = correct / max(1, total)
        trainer.student.train(was)
        self.records.append(record)


def correlate(records: list[dict]) -> dict[str, dict[str, float | None]]:
    """Spearman and Pearson of each distance series against the loss and dev accuracy."""
    from scipy.stats import pearsonr, spearmanr

    def corr(fn, x, y):
        if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
            return None
        value = fn(x, y)[0]
        return None if math.isnan(value) else float(value)

    keys = [k for k in records[0] if "/" in k] if records else []
    out = {}
    for key in keys:
        xs = [r[key] for r in records]
        row = {"spearman_loss": corr(spearmanr, xs, [r["loss"] for r in records]),
               "pearson_loss": corr(pearsonr, xs, [r["loss"] for r in records])}
        if all("dev_acc" in r for r in records):
            dev = [r["dev_acc"] for r in records]
            row.update(spearman_dev=corr(spearmanr, xs, dev), pearson_dev=corr(pearsonr, xs, dev))
        out[key] = row
    return out


def plot_heatmap(correlations: dict[str, dict], path: str | Path, title: str = "feature distance vs loss") -> Path:
    """Rows: feature kind and distance; columns: layer pairs; colour: Spearman vs the loss
    (left) and vs the dev accuracy (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def split(key):
        feature, _, measure = key.partition("/")
        kind, _, pair = feature.partition(":")
        return f"{kind} {measure}", pair or "-"

    rows = sorted({split(k)[0] for k in correlations})
    cols = sorted({split(k)[1] for k in correlations})
    panels = [m for m in ("spearman_loss", "spearman_dev") if any(m in v for v in correlations.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 + 1.2 * len(cols) * len(panels), 0.22 * len(rows) + 1.5),
                             squeeze=False)
    for ax, metric in zip(axes[0], panels):
        grid = np.full((len(rows), len(cols)), np.nan)
        for key, v in correlations.items():
            r, c = split(key)
            if v.get(metric) is not None:
                grid[rows.index(r), cols.index(c)] = v[metric]
        im = ax.imshow(grid, cmap="coolwarm", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, fontsize=7)
        ax.set_yticks(range(len(rows)), rows if ax is axes[0][0] else [""] * len(rows), fontsize=6)
        ax.set_title(metric.replace("_", " vs "), fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.6)
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(recorder: DistanceRecorder, out_dir: str | Path, title: str) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    correlations = correlate(recorder.records)
    write_json(out / "analysis.json", {"pairs": recorder.pairs, "records": recorder.records,
                                       "correlations": correlations}, indent=1)
    if correlations:
        plot_heatmap(correlations, out / "analysis.png", title)
    return correlations
