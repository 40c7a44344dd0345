"""Layer maps, registered by name: which student layer learns from which teacher layer.

A map is ``fn(student_layers, teacher_layers, **args) -> [(s, t), ...]`` (0-based encoder
layers). A :class:`~autoskd.engine.spec.FeatureLoss` names one in ``layers``; arguments
follow a colon (``"list:0-2,1-5"``, ``"skip"``). Maps that change over training (RAIL-KD's
random draw per epoch, ALP-KD's attention over every teacher layer) are methods' own
behaviour and live in the method class; ``all`` gives those methods every teacher layer.
"""

from __future__ import annotations

from typing import Callable

from ..errors import AutoSKDError
from ..registry import Registry

LayerMap = Callable[..., list[tuple[int, int]]]
LAYER_MAPS: Registry[LayerMap] = Registry("layer map")


def parse_map(name: str) -> tuple[str, str]:
    kind, _, arg = str(name).partition(":")
    return kind.strip(), arg.strip()


def map_layers(layers: str, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs for the named map (``none`` -> no pairs)."""
    kind, arg = parse_map(layers)
    return LAYER_MAPS.get(kind)(student_layers, teacher_layers, arg)


@LAYER_MAPS.register("none")
def _none(ls: int, lt: int, arg: str = "") -> list[tuple[int, int]]:
    return []


@LAYER_MAPS.register("last")
def last(ls: int, lt: int, arg: str = "") -> list[tuple[int, int]]:
    """The last layers only (MiniLM, MiniLMv2)."""
    return [(ls - 1, lt - 1)]


@LAYER_MAPS.register("uniform")
def uniform(ls: int, lt: int, arg: str = "") -> list[tuple[int, int]]:
    """TinyBERT's g(m) = m * N/M: student layer s learns from teacher layer (s+1)*N//M - 1,
    so the last student layer always meets the last teacher layer."""
    if lt < ls:
        raise AutoSKDError(f"uniform layer mapping needs a teacher at least as deep as the student "
                           f"(teacher {lt} < student {ls} layers); use a deeper teacher")
    return [(s, (s + 1) * lt // ls - 1) for s in range(ls)]


@LAYER_MAPS.register("skip")
def skip(ls: int, lt: int, arg: str = "") -> list[tuple[int, int]]:
    """PKD-skip: every k-th teacher layer (k = Lt/Ls) for the student's intermediate layers,
    the last layer excluded (its knowledge comes through the logits)."""
    return uniform(ls, lt)[:-1]


@LAYER_MAPS.register("one_to_one")
def one_to_one(ls: int, lt: int, arg: str = "") -> list[tuple[int, int]]:
    """Layer s <-> layer s (MobileBERT: equal depths); a shallower student uses the uniform map."""
    return [(s, s) for s in range(ls)] if ls == lt else uniform(ls, lt)


@LAYER_MAPS.register("all")
def all_layers(ls: int, lt: int, arg: str = "") -> list[tuple[int, int]]:
    """Every student layer with every teacher layer (ALP-KD/Universal-KD attend over them)."""
    return [(s, t) for s in range(ls) for t in range(lt)]


@LAYER_MAPS.register("list")
def explicit(ls: int, lt: int, arg: str = "") -> list[tuple[int, int]]:
    """An explicit list ``"list:0-2,1-5"`` (student-teacher, 0-based; ``"list:0/-1"`` for negatives,
    which count from the end)."""
    pairs = []
    for item in filter(None, (p.strip() for p in arg.split(","))):
        sep = "/" if "/" in item else "-"
        try:
            s, t = (int(v) for v in item.split(sep))
        except ValueError:
            raise AutoSKDError(f"layer map 'list:{arg}': {item!r} must look like S-T (or S/T with negatives), "
                               f"e.g. list:0-2,1-5") from None
        s, t = s + ls if s < 0 else s, t + lt if t < 0 else t
        if not (0 <= s < ls and 0 <= t < lt):
            raise AutoSKDError(f"layer map 'list:{arg}': pair {item!r} is outside student 0..{ls - 1} / "
                               f"teacher 0..{lt - 1}")
        pairs.append((s, t))
    if not pairs:
        raise AutoSKDError("layer map 'list' needs pairs, e.g. list:0-2,1-5")
    return pairs


@LAYER_MAPS.register("uniform_lower")
def uniform_lower(ls: int, lt: int, arg: str = "") -> list[tuple[int, int]]:
    """The uniform pairs of student layers below k (``uniform_lower:3``; MGSKD's token/span levels)."""
    k = int(arg or 3)
    return [(s, t) for s, t in uniform(ls, lt) if s < k]


@LAYER_MAPS.register("uniform_upper")
def uniform_upper(ls: int, lt: int, arg: str = "") -> list[tuple[int, int]]:
    """The uniform pairs of student layers k and above (MGSKD's sample level)."""
    k = int(arg or 3)
    return [(s, t) for s, t in uniform(ls, lt) if s >= k]
