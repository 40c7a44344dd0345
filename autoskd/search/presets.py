"""Named settings for ``autoskd search``.

``quick`` fits a cold ``make demo`` (team build included) in about 15 minutes on a 2-core
CPU: subsampled data, short training, a few candidates (measured: 11.4 minutes of compute). ``paper`` follows AutoSKDBERT
(section 3, table 13 and App. E): full splits, 25 candidates, 200 random distributions,
5 epochs of candidate evaluation on SST-2-sized tasks, Adam on theta with lr 5e-4 and
weight decay 1e-3, second-order unrolled gradient, SSWO.
"""

from __future__ import annotations

from ..errors import AutoSKDError

PRESETS: dict[str, dict] = {
    # Measured on this 2-core CPU: at 1,000 training rows the briefly fine-tuned teachers have
    # small logit margins, so theta_i-scaled soft targets alone teach the student nothing (it
    # stays at the majority class); hard labels (alpha 0.5) keep it learning, and theta only
    # moves after a warm-up, with a larger lr and the cheaper first-order gradient.
    "quick": {
        "max_train": 500, "max_eval": 400,
        "search_epochs": 4.0, "batch_size": 32, "lr": 5e-4,
        "theta": {"lr": 1e-2, "num_candidates": 4, "order": "first", "every": 1, "warmup": 0.25},
        "eval_epochs": 2.0, "n_random": 3, "method_options": {"temperature": 1.0, "alpha": 0.5},
    },
    "paper": {
        "max_train": None, "max_eval": None,
        "search_epochs": 5.0, "batch_size": 32, "lr": 2e-4,
        "theta": {"lr": 5e-4, "num_candidates": 25, "order": "second", "every": 1, "warmup": 0.0},
        "eval_epochs": 5.0, "n_random": 200, "method_options": {"temperature": 1.0, "alpha": 1.0},
    },
}


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise AutoSKDError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    preset = dict(PRESETS[name])
    preset["theta"] = dict(preset["theta"])
    return preset
