"""Models loaded on first use.

A search trial distils from cached teacher *logits*: with a logits-only method (``kd``) and a
warm teacher-output cache it never runs a teacher forward. Loading every teacher's weights
anyway costs each trial time and, worse with trials running side by side, hundreds of MB of
memory (the default ladder's five teachers hold 87M parameters). :class:`LazyModel` defers
the load until something needs the weights: a feature beyond logits, or logits missing from
the cache. Code that only needs a model's *shape* (layer count, widths, for the auxiliary
model) gets :meth:`LazyModel.shape_model`, an architecture built on the ``meta`` device
without reading any weights.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Callable, Iterator

import torch
from torch import nn


class LazyModel:
    """A model whose weights are read by ``load()`` the first time :meth:`get` is called.

    ``shape`` (optional) builds a weightless copy with the same architecture; without it
    :meth:`shape_model` loads the real model.
    """

    def __init__(self, load: Callable[[], nn.Module], shape: Callable[[], nn.Module] | None = None):
        self._load = load
        self._shape = shape
        self._model: nn.Module | None = None
        self._skeleton: nn.Module | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def has_shape(self) -> bool:
        """Whether :meth:`shape_model` answers without reading the weights."""
        return self._model is not None or self._shape is not None

    def get(self) -> nn.Module:
        if self._model is None:
            self._model = self._load()
            self._skeleton = None
        return self._model

    def shape_model(self) -> nn.Module:
        """The loaded model if there is one, else a weightless model of the same shape."""
        if self._model is not None or self._shape is None:
            return self.get()
        if self._skeleton is None:
            self._skeleton = self._shape()
        return self._skeleton

    def __repr__(self) -> str:
        return f"LazyModel(loaded={self.loaded})"


def meta_skeleton(source: str) -> nn.Module:
    """A sequence classifier with ``source``'s config, built on the meta device (no weights read)."""
    from transformers import AutoModelForSequenceClassification

    from .loading import load_config

    config = load_config(source)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


class LazyModels(MutableMapping):
    """``name -> nn.Module`` where some entries are :class:`LazyModel`: indexing loads them.

    :meth:`entry` returns the stored value (module or LazyModel) without loading, for code that
    can defer the load further (the engine's :class:`~autoskd.engine.teachers.Teacher`).
    """

    def __init__(self, items: dict | None = None):
        self._items: dict[str, nn.Module | LazyModel] = dict(items or {})

    def __getitem__(self, name: str) -> nn.Module:
        value = self._items[name]
        return value.get() if isinstance(value, LazyModel) else value

    def __setitem__(self, name: str, value: nn.Module | LazyModel) -> None:
        self._items[name] = value

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def entry(self, name: str) -> nn.Module | LazyModel:
        return self._items[name]

    def loaded(self, name: str) -> bool:
        value = self._items[name]
        return not isinstance(value, LazyModel) or value.loaded

    def __repr__(self) -> str:
        return f"LazyModels({ {n: ('loaded' if self.loaded(n) else 'lazy') for n in self._items} })"


def model_entry(models, name: str) -> nn.Module | LazyModel:
    """``models[name]`` without loading it when ``models`` is a :class:`LazyModels`."""
    return models.entry(name) if isinstance(models, LazyModels) else models[name]
