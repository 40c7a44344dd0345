"""Named settings for ``autoskd search``.

``quick`` fits a cold ``make demo`` (team build included) in about 15 minutes on a 2-core
CPU: subsampled data, short training, a few candidates. ``medium`` is sized for
``benchmarks/search_vs_random.py``. ``paper`` follows AutoSKDBERT
(section 3, table 13 and App. E): full splits, 25 candidates, 200 random distributions,
5 epochs of candidate evaluation on SST-2-sized tasks, Adam on theta with lr 5e-4 and
weight decay 1e-3, second-order unrolled gradient, SSWO.

The measurements behind each choice are in ``benchmarks/README.md``.
"""

from __future__ import annotations

from ..errors import AutoSKDError

PRESETS: dict[str, dict] = {
    # At 1,000 training rows the briefly fine-tuned teachers have small logit margins, so
    # theta_i-scaled soft targets alone teach the student nothing (it stays at the majority
    # class): hard labels (alpha 0.5) keep it learning, and theta only moves after a warm-up,
    # with a larger lr and the cheaper first-order gradient.
    "quick": {
        "max_train": 500, "max_eval": 400,
        "search_epochs": 4.0, "batch_size": 32, "lr": 5e-4,
        "theta": {"lr": 1e-2, "num_candidates": 4, "order": "first", "every": 1, "warmup": 0.25},
        "eval_epochs": 2.0, "n_random": 3, "method_options": {"temperature": 1.0, "alpha": 0.5},
        # length-grouped batches: far less padding on these short reviews, what brings a cold
        # `make demo` under 15 minutes
        "group_by_length": True,
    },
    # Sized for benchmarks/search_vs_random.py --preset medium (5 seeds, every arm) on a 2-core
    # CPU with the team cached: teachers fine-tuned on the whole training split (good teachers),
    # dev and test whole (1,281 rows each), students on 500 + 500 rows; the search runs 8
    # epochs of the train half, so phase 2 is 4 epochs and each of the 4 candidates comes from
    # the end of one of them (App. B.3). Pure distillation (alpha 1, the paper's setting): these
    # teachers saw the whole training split, so their soft targets carry more than 500 gold
    # labels, and it was the medium ablation's largest effect. Plain first-order θ-gradient (order
    # first, xi 0: one val forward per θ step): it ends at the θ of the paper's second order at
    # about half the search's cost, and the random arm of search_vs_random gets as many more
    # trainings as the search costs. The paper's theta_i scaling stays: n*theta_i
    # (--set theta.scaling=n) removed the collapses of theta-scaled students but moved no mean
    # beyond the noise.
    "medium": {
        "max_train": 500, "max_eval": None, "teachers_full_data": True,
        "search_epochs": 8.0, "batch_size": 32, "lr": 5e-4,
        "theta": {"lr": 1e-2, "num_candidates": 4, "order": "first", "xi": 0.0, "every": 1, "warmup": 0.25},
        "eval_epochs": 3.0, "n_random": 8, "method_options": {"temperature": 1.0, "alpha": 1.0},
    },
    # Language-model teams (``--task lm:<corpus>``; the default preset there): the ladder's six
    # cached teachers' top-64 rows, 800 training documents, every arm and the search at 40
    # student steps of 4 x 128 tokens (benchmarks/lm_search_vs_random.py's budget). θ settings:
    # autoskd.search.lm_search.lm_theta_defaults says why each differs from the classifier's.
    "lm-quick": {
        "max_train": 800, "max_eval": 200,
        "search_epochs": 1.0, "batch_size": 4, "lr": 2e-4, "max_steps": 40, "top_k": 64,
        "theta": {"strategy": "cr", "scaling": "none", "val_objective": "teacher_mixture", "order": "second",
                  "xi": "student_lr", "lr": 0.05, "num_candidates": 2, "warmup": 0.1, "every": 2, "center": True},
        "eval_epochs": 1.0, "n_random": 2, "executor": "local",
        "method_options": {"loss": "forward_kl", "alpha": 1.0, "temperature": 1.0},
    },
    # AutoSKDBERT's own settings: 8 theta learning rates (3e-4 ... 1e-3) x 25 candidates against
    # 200 random distributions (figure 3), pure distillation, second order, full splits.
    "paper": {
        "max_train": None, "max_eval": None, "teachers_full_data": True,
        "search_epochs": 5.0, "batch_size": 32, "lr": 2e-4,
        "theta": {"lr": 5e-4, "num_candidates": 25, "order": "second", "every": 1, "warmup": 0.0},
        "theta_lrs": [3e-4, 4e-4, 5e-4, 6e-4, 7e-4, 8e-4, 9e-4, 1e-3],
        "eval_epochs": 5.0, "n_random": 200, "method_options": {"temperature": 1.0, "alpha": 1.0},
    },
}


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise AutoSKDError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    preset = dict(PRESETS[name])
    preset["theta"] = dict(preset["theta"])
    preset["method_options"] = dict(preset["method_options"])
    return preset
