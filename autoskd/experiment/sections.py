"""What each section of an experiment file may hold (see :mod:`autoskd.experiment`).

Defaults are read from the engine's own settings classes (``DistillConfig``, ``LMDistillConfig``,
``TuneSettings``, the search presets), never restated here: a hyperparameter has one default,
and the command line, the file and the Python API agree on it.
"""

from __future__ import annotations

from dataclasses import fields

from .schema import (Field, baselines, cluster, encoding, flag, folder, list_of, mapping, names, number, one_of,
                     optional, storage, text, whole)

KINDS = ("distill", "stages", "search", "tune", "chain")
#: the section each kind reads (named after the kind)
SECTIONS = KINDS
#: kinds whose runs take the ``scale:`` section (DeepSpeed / tensor parallelism)
SCALED = ("distill", "stages", "search")
#: top-level keys, in the order the resolved file lists them
TOP_KEYS = ("kind", "task", "seed", "out", *SECTIONS, "scale", "team", "cache_dir", "progress")
#: keys that never change a run's numbers: left out of its fingerprint
VOLATILE = ("out", "cache_dir", "progress")


def resume_free() -> tuple[str, ...]:
    """Keys (dotted) a rerun into the same ``out`` may change and still resume: where and how fast
    a search or a tune runs, and how far it goes (``search.theta_only``, more ``tune.trials``),
    never what a finished artifact computed. Each layer names its own (one list per layer)."""
    from ..fanout.tune import RESUME_FREE as TUNE_FREE
    from ..search.run import RESUME_FREE as SEARCH_FREE

    return VOLATILE + tuple(f"search.{k}" for k in SEARCH_FREE) + tuple(f"tune.{k}" for k in TUNE_FREE)

DEFAULT_TASK = "rotten_tomatoes"
DEFAULT_CACHE = ".cache/autoskd"


def _defaults(cls) -> dict:
    instance = cls()
    return {f.name: getattr(instance, f.name) for f in fields(cls)}


def top_table(kind: str) -> dict[str, Field]:
    """``seed``, ``out``, ``cache_dir``, ``progress`` (``kind``, ``team``, ``task`` and the
    sections are resolved on their own). ``out`` of a tune defaults to ``runs/tune/<study>``."""
    return {"seed": Field(0, whole(0)),
            "out": Field(None if kind == "tune" else f"runs/{kind}", optional(folder)),
            "cache_dir": Field(DEFAULT_CACHE, folder),
            "progress": Field(True, flag)}


def task_table(lm: bool) -> dict[str, Field]:
    """A classification task (built-in name, data file or ``datasets`` name), or a language-model
    corpus (``lm:<corpus>``, text or prompt/completion columns)."""
    common = {"name": Field(DEFAULT_TASK, text), "text_column": Field(None, optional(text))}
    limits = {"max_train": Field(None, optional(whole(1))),  # rows kept in each of train and val
              "max_eval": Field(None, optional(whole(1)))}  # rows kept in each of dev and test
    if lm:
        return {**common, "prompt_column": Field(None, optional(text)),
                "completion_column": Field(None, optional(text)), **limits}
    return {**common, "text_pair_column": Field(None, optional(text)), "label_column": Field(None, optional(text)),
            "encoding": Field(None, optional(encoding)), **limits}


def distill_table(lm: bool) -> dict[str, Field]:
    """One distillation: the method, its options and the training settings. A language-model
    task adds the decoder settings (``precision``, ``top_k``, ``layout``, ``max_steps``) and has
    no ``policy``, ``teachers`` or ``pretrain_epochs``."""
    from ..pipeline import DistillConfig

    d = _defaults(DistillConfig)
    table = {"method": Field(d["method"], _method_ref), "options": Field({}, mapping),
             "teacher": Field(None, optional(text))}
    if not lm:
        table["teachers"] = Field(None, optional(names))
        table["policy"] = Field(d["policy"], one_of("single", "average"))
    table.update({"epochs": Field(d["epochs"], number(above=0)), "lr": Field(d["lr"], number(above=0)),
                  "batch_size": Field(d["batch_size"], whole(1)),
                  "max_length": Field(d["max_length"], optional(whole(2))),
                  "warmup_ratio": Field(d["warmup_ratio"], number(at_least=0, below=1)),
                  "weight_decay": Field(d["weight_decay"], number(at_least=0))})
    if not lm:
        table["pretrain_epochs"] = Field(d["pretrain_epochs"], number(at_least=0))
        return table
    from ..lm.pipeline import PRECISIONS, LMDistillConfig

    lm_d = _defaults(LMDistillConfig)
    table.update({"max_steps": Field(lm_d["max_steps"], optional(whole(1))),
                  "precision": Field(lm_d["precision"], one_of(*PRECISIONS)),
                  "top_k": Field(lm_d["top_k"], whole(0)),
                  "layout": Field(lm_d["layout"], one_of("packed", "padded"))})
    return table


def _method_ref(value):
    """A method name, a combination ``a+b``, a YAML file, or a list of combined methods."""
    if isinstance(value, list) and value:
        return value
    return text(value)


def stages_table() -> dict[str, Field]:
    """A stage plan (``plan``: its file or its list of stages) and what the stages share."""
    from ..pipeline import DistillConfig

    d = _defaults(DistillConfig)
    return {"plan": Field(None, lambda v: v), "teacher": Field(None, optional(text)),
            "teachers": Field(None, optional(names)), "batch_size": Field(d["batch_size"], whole(1)),
            "max_length": Field(d["max_length"], optional(whole(2)))}


def chain_table() -> dict[str, Field]:
    """Teacher -> assistants -> student. ``epochs`` are per hop (default 1: a chain trains
    one student per assistant)."""
    from ..pipeline import DistillConfig

    d = _defaults(DistillConfig)
    return {"method": Field("takd", one_of("takd", "dgkd")),
            "assistants": Field([4], list_of(whole(1), "layer counts")), "options": Field({}, mapping),
            "teacher": Field(None, optional(text)), "epochs": Field(1.0, number(above=0)),
            "lr": Field(d["lr"], number(above=0)), "batch_size": Field(d["batch_size"], whole(1)),
            "max_length": Field(d["max_length"], optional(whole(2)))}


def search_table(preset: dict) -> dict[str, Field]:
    """AutoSKD's settings: ``preset`` names the bundle the other keys start from (``theta`` and
    ``method_options`` are merged key by key with the preset's, as ``SearchConfig.from_preset``
    does). ``seed``, ``task.max_train``/``max_eval`` and ``scale`` live in their own places."""
    from ..search.lm_search import CANDIDATE_POLICIES
    from ..search.presets import PRESETS

    def get(key, fallback=None):
        return preset.get(key, fallback)

    return {"preset": Field(get("preset", "quick"), one_of(*PRESETS)),
            "search_epochs": Field(get("search_epochs"), number(above=0)),
            "eval_epochs": Field(get("eval_epochs"), number(above=0)),
            "batch_size": Field(get("batch_size"), whole(1)), "lr": Field(get("lr"), number(above=0)),
            "m": Field(get("m"), optional(whole(0))),
            "theta": Field(get("theta"), mapping),
            "theta_lrs": Field(get("theta_lrs"), optional(list_of(number(above=0), "numbers > 0"))),
            "baselines": Field(get("baselines"), baselines), "n_random": Field(get("n_random"), whole(0)),
            "executor": Field(get("executor"), one_of("ray", "local")),
            "address": Field(get("address"), optional(cluster)),
            "cpus_per_trial": Field(get("cpus_per_trial"), number(above=0)),
            "gpus_per_trial": Field(get("gpus_per_trial"), number(at_least=0)),
            "max_concurrent": Field(get("max_concurrent"), optional(whole(1))),
            "scheduler": Field(get("scheduler"), _search_scheduler),
            "teachers_full_data": Field(get("teachers_full_data"), flag),
            "method_options": Field(get("method_options"), mapping),
            "group_by_length": Field(get("group_by_length"), flag),
            "theta_only": Field(get("theta_only"), flag),
            "candidate_policy": Field(get("candidate_policy", "sampled"), one_of(*CANDIDATE_POLICIES)),
            "max_steps": Field(get("max_steps"), optional(whole(1))), "top_k": Field(get("top_k", 64), whole(0))}


def _search_scheduler(value):
    one_of(None, "none", "asha")(value)
    return None if value == "none" else value


def theta_table(preset_theta: dict) -> dict[str, Field]:
    """θ's optimiser (:class:`autoskd.search.theta_step.ThetaConfig`), defaults from the preset."""
    from ..search.distribution import STRATEGIES
    from ..search.theta_step import VAL_OBJECTIVES, ThetaConfig

    t = {**_defaults(ThetaConfig), **preset_theta}
    return {"strategy": Field(t["strategy"], one_of(*STRATEGIES)), "order": Field(t["order"], one_of("first", "second")),
            "lr": Field(t["lr"], number(above=0)), "weight_decay": Field(t["weight_decay"], number(at_least=0)),
            "xi": Field(t["xi"], _xi), "val_objective": Field(t["val_objective"], one_of(*VAL_OBJECTIVES)),
            "scaling": Field(t["scaling"], one_of("theta", "max", "n", "none")),
            "num_candidates": Field(t["num_candidates"], whole(1)),
            "candidate_span": Field(t["candidate_span"], number(above=0, at_most=1)),
            "every": Field(t["every"], whole(1)), "history_every": Field(t["history_every"], whole(1)),
            "warmup": Field(t["warmup"], number(at_least=0, below=1)), "center": Field(t["center"], flag)}


def _xi(value):
    if value in ("theta_lr", "student_lr"):
        return value
    from .schema import Invalid

    try:
        return number(at_least=0)(value)
    except Invalid:
        raise Invalid(f"must be theta_lr, student_lr or a number >= 0, got {value!r}") from None


def tune_table() -> dict[str, Field]:
    """``autoskd tune``: the search space (its file or its mapping) and how to sample it."""
    from ..search.early_stop import SCHEDULERS
    from ..fanout.study import SAMPLERS
    from ..fanout.trial import OBJECTIVES
    from ..fanout.tune import TuneSettings

    d = _defaults(TuneSettings)
    return {"space": Field(None, lambda v: v), "sampler": Field(d["sampler"], one_of(*SAMPLERS)),
            "scheduler": Field(d["scheduler"], one_of(*SCHEDULERS)), "trials": Field(d["trials"], optional(whole(1))),
            "storage": Field(d["storage"], optional(storage)), "study": Field(d["study"], optional(text)),
            "objective2": Field(d["objective2"], optional(one_of(*sorted(OBJECTIVES)))),
            "batch_size": Field(None, optional(whole(1))),
            "grace_period": Field(d["grace_period"], whole(1)),
            "reduction_factor": Field(d["reduction_factor"], number(above=1)),
            "address": Field(d["address"], optional(cluster)),
            "cpus_per_trial": Field(d["cpus_per_trial"], number(above=0)),
            "gpus_per_trial": Field(d["gpus_per_trial"], number(at_least=0)),
            "max_concurrent": Field(d["max_concurrent"], optional(whole(1)))}


def scale_table(kind: str) -> dict[str, Field]:
    """DeepSpeed (a config file or its mapping) and tensor parallelism; a search also runs each
    trial as a group of processes."""
    table = {"deepspeed": Field(None, lambda v: v), "tensor_parallel": Field(1, whole(1))}
    if kind == "search":
        table["processes_per_trial"] = Field(1, whole(1))
    return table
