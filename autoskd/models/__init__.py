"""Models: loading classifiers (hub id / local path / alias / nn.Module) and architecture adapters."""

from .loading import (
    INIT_CHOICES,
    MODEL_ALIASES,
    count_layers,
    count_parameters,
    freeze,
    hidden_size,
    init_from_teacher,
    load_classifier,
    load_config,
    load_tokenizer,
    resolve_source,
    save_student,
    truncate_layers,
)

__all__ = [
    "INIT_CHOICES",
    "MODEL_ALIASES",
    "count_layers",
    "count_parameters",
    "freeze",
    "hidden_size",
    "init_from_teacher",
    "load_classifier",
    "load_config",
    "load_tokenizer",
    "resolve_source",
    "save_student",
    "truncate_layers",
]
