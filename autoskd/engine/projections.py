"""Projections, registered by name: how many ``nn.Linear`` maps a student feature gets.

Each entry returns the key under which the auxiliary model stores (and so shares) the
``nn.Linear(student width, teacher width)`` for one resolved loss term:

``linear`` / ``per_layer``  one per teacher, term and layer pair (TinyBERT's W_h per layer)
``per_teacher``             one per teacher and term, shared by its layer pairs (MT-BERT)
``shared``                  one per term, shared by every layer pair and teacher (TinyBERT's
                            single ``fit_dense``; teachers must then have one width)
"""

from __future__ import annotations

from typing import Callable

from ..registry import Registry

ProjectionKey = Callable[[str, str, str], str]
PROJECTIONS: Registry[ProjectionKey] = Registry("projection")


def _safe(name: str) -> str:
    return str(name).replace(".", "_") or "_"


@PROJECTIONS.register("linear")
def per_layer(teacher: str, key: str, base: str) -> str:
    return f"{_safe(teacher)}/{key}"


PROJECTIONS.register("per_layer")(per_layer)


@PROJECTIONS.register("per_teacher")
def per_teacher(teacher: str, key: str, base: str) -> str:
    return f"{_safe(teacher)}/{base}"


@PROJECTIONS.register("fit_dense")
def fit_dense(teacher: str, key: str, base: str) -> str:
    """TinyBERT's ``fit_dense``: one Linear per teacher, shared by every term and layer naming it."""
    return f"{_safe(teacher)}/fit_dense"


@PROJECTIONS.register("shared")
def shared(teacher: str, key: str, base: str) -> str:
    return f"shared/{base}"
