"""Search spaces: one YAML file = one tuning experiment (``search_spaces/*.yaml``).

A file names what every trial runs (``kind``), the values every trial shares (``fixed``) and
the values the sampler chooses (``params``)::

    name: kd-hparams
    kind: distill                 # distill: one pipeline.distill per trial
                                  # autoskd: one AutoSKD search (run_search) per trial
                                  # lm: one lm.pipeline.distill_lm per trial (an lm:<corpus> task)
    fixed: {method: kd, epochs: 2}
    params:
      lr: {loguniform: [1.0e-5, 1.0e-3]}
      method_options.temperature: {uniform: [1, 8]}
      method_options.alpha: {choice: [0.5, 1.0]}
      student.layers: {int: [1, 3]}
      method: {grid: all}         # every registered method; "a+b" names a combination

Domains and what they become:

===============  ==========================  ====================================  =========
YAML             Ray Tune                    Optuna                                grid
===============  ==========================  ====================================  =========
grid: [a, b]     ``tune.grid_search``        ``CategoricalDistribution``           a, b
choice: [a, b]   ``tune.choice``             ``CategoricalDistribution``           a, b
uniform: [l, h]  ``tune.uniform``            ``FloatDistribution(l, h)``           --
loguniform       ``tune.loguniform``         ``FloatDistribution(l, h, log=True)`` --
int: [l, h]      ``tune.randint(l, h + 1)``  ``IntDistribution(l, h)``             l..h
===============  ==========================  ====================================  =========

Every mistake in a file is one :class:`~autoskd.errors.AutoSKDError` naming the key.
Method names are checked against the method registry when the file is loaded, so the space
accepts any method registered now or later.

A ``kind: lm`` space tunes distillation on a decoder-LM team (``--task lm:<corpus>``): its keys
are :class:`~autoskd.lm.pipeline.LMDistillConfig` fields, ``method_options.<option>`` (``loss``,
``temperature``...) and the student's depth, ``student.depth`` (k of the team student's layers,
spread evenly, first and last kept) or ``student.layers``/``student.init`` (the member's own
keys). Its methods and categorical option values are checked against the decoder recipes when
the file loads, so a loss the LM losses do not know is refused before any trial runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import AutoSKDError

__all__ = ["Domain", "SearchSpace", "load_space", "check_space_task", "KINDS", "DOMAINS", "SPACES_DIR"]

SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
KINDS = ("distill", "autoskd", "lm")
DOMAINS = ("grid", "choice", "uniform", "loguniform", "int")
#: keys of a ``distill`` trial besides DistillConfig's fields
_DISTILL_EXTRA = ("student.layers", "student.init")
_DISTILL_SKIP = ("method_options", "theta")  # set through method_options.<name> / not tunable
_AUTOSKD_SKIP = ("theta", "method_options", "executor", "address", "max_train", "max_eval",
                 "cpus_per_trial", "gpus_per_trial", "max_concurrent")
_MAX_INT_GRID = 64
#: keys of an ``lm`` trial besides LMDistillConfig's fields: the student's depth (k of the team
#: student's layers, spread) and the member's own ``layers``/``init``
_LM_EXTRA = ("student.depth", "student.layers", "student.init")
_LM_SKIP = ("method_options", "theta")  # set through method_options.<name> / AutoSKD's search sets θ


def _distill_keys() -> set[str]:
    from ..pipeline import DistillConfig

    return {f.name for f in dataclasses.fields(DistillConfig) if f.name not in _DISTILL_SKIP} | set(_DISTILL_EXTRA)


def _autoskd_keys() -> tuple[set[str], set[str]]:
    from ..search.run import SearchConfig
    from ..search.theta_step import ThetaConfig

    top = {f.name for f in dataclasses.fields(SearchConfig) if f.name not in _AUTOSKD_SKIP}
    return top, {f.name for f in dataclasses.fields(ThetaConfig)}


def _lm_keys() -> set[str]:
    from ..lm.pipeline import LMDistillConfig

    return {f.name for f in dataclasses.fields(LMDistillConfig) if f.name not in _LM_SKIP} | set(_LM_EXTRA)


def check_method_name(value: Any, key: str) -> str:
    """A registered method name, or a combination ``a+b`` of registered names."""
    from ..methods import METHODS

    if not isinstance(value, str) or not value.strip():
        raise AutoSKDError(f"search space key '{key}': method {value!r} must be a method name (see `autoskd methods`)")
    parts = [p.strip() for p in value.split("+")]
    unknown = [p for p in parts if p not in METHODS]
    if unknown or not all(parts):
        raise AutoSKDError(f"search space key '{key}': unknown method {', '.join(unknown) or value!r}; "
                           f"registered: {', '.join(METHODS.names())}")
    return "+".join(p.lower() for p in parts)


def all_methods() -> list[str]:
    """``all``: every registered distillation method (``finetune`` uses no teacher and is left out)."""
    from ..methods import METHODS

    return [n for n in METHODS.names() if n != "finetune"]


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # YAML reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            raise AutoSKDError(f"search space key '{key}': {value!r} is not a number") from None
    if not math.isfinite(value):
        raise AutoSKDError(f"search space key '{key}': {value!r} is not a finite number")
    return value


@dataclass(frozen=True)
class Domain:
    """One tunable value: its YAML kind and arguments."""

    key: str
    kind: str
    values: tuple = ()
    low: float | int | None = None
    high: float | int | None = None

    @classmethod
    def parse(cls, key: str, raw: Any, method: bool = False) -> "Domain":
        if not isinstance(raw, dict) or len(raw) != 1:
            raise AutoSKDError(f"search space key '{key}': expected one of {{{': ..., '.join(DOMAINS)}: ...}} "
                               f"(got {raw!r}); put constants under 'fixed:'")
        (kind, arg), = raw.items()
        if kind not in DOMAINS:
            raise AutoSKDError(f"search space key '{key}': unknown domain {kind!r}; choose one of: {', '.join(DOMAINS)}")
        if kind in ("grid", "choice"):
            if method and arg == "all":
                arg = all_methods()
            if not isinstance(arg, list) or not arg:
                raise AutoSKDError(f"search space key '{key}': {kind} needs a non-empty list of values (got {arg!r})")
            if method:
                arg = [check_method_name(v, key) for v in arg]
            for v in arg:
                if not isinstance(v, (str, int, float, bool)) and v is not None:
                    raise AutoSKDError(f"search space key '{key}': {kind} values must be numbers, strings or booleans "
                                       f"(got {v!r})")
            if len(set(map(repr, arg))) != len(arg):
                raise AutoSKDError(f"search space key '{key}': {kind} lists a value twice")
            return cls(key, kind, values=tuple(arg))
        if not isinstance(arg, list) or len(arg) != 2:
            raise AutoSKDError(f"search space key '{key}': {kind} needs [low, high] (got {arg!r})")
        low, high = (_number(v, key) for v in arg)
        if kind == "int":
            if low != int(low) or high != int(high):
                raise AutoSKDError(f"search space key '{key}': int bounds must be integers (got {arg!r})")
            low, high = int(low), int(high)
        if not low < high:
            raise AutoSKDError(f"search space key '{key}': low must be below high (got {arg!r})")
        if kind == "loguniform" and low <= 0:
            raise AutoSKDError(f"search space key '{key}': loguniform bounds must be > 0 (got {arg!r})")
        return cls(key, kind, low=low, high=high)

    # ---- mappings onto the libraries' own types
    def to_tune(self):
        from ray import tune

        return {"grid": lambda: tune.grid_search(list(self.values)), "choice": lambda: tune.choice(list(self.values)),
                "uniform": lambda: tune.uniform(self.low, self.high),
                "loguniform": lambda: tune.loguniform(self.low, self.high),
                "int": lambda: tune.randint(self.low, self.high + 1)}[self.kind]()

    def to_optuna(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind in ("grid", "choice"):
            return CategoricalDistribution(list(self.values))
        if self.kind == "int":
            return IntDistribution(self.low, self.high)
        return FloatDistribution(float(self.low), float(self.high), log=self.kind == "loguniform")

    def grid_values(self) -> list:
        if self.kind in ("grid", "choice"):
            return list(self.values)
        if self.kind == "int" and self.high - self.low < _MAX_INT_GRID:
            return list(range(self.low, self.high + 1))
        raise AutoSKDError(f"search space key '{self.key}': a {self.kind} range has no grid; use grid/choice "
                           f"values or another sampler (random, tpe, cmaes)")


@dataclass
class SearchSpace:
    """A parsed ``search_spaces/*.yaml`` file."""

    name: str
    kind: str = "distill"
    description: str = ""
    fixed: dict = field(default_factory=dict)
    params: dict[str, Domain] = field(default_factory=dict)
    path: str | None = None

    @classmethod
    def from_dict(cls, data: Any, name: str = "space", path: str | None = None) -> "SearchSpace":
        if not isinstance(data, dict):
            raise AutoSKDError(f"search space {path or name}: expected a mapping with 'params' (got {type(data).__name__})")
        unknown = sorted(set(data) - {"name", "kind", "description", "fixed", "params"})
        if unknown:
            raise AutoSKDError(f"search space key '{unknown[0]}' is unknown; top-level keys: name, kind, description, "
                               "fixed, params")
        kind = data.get("kind", "distill")
        if kind not in KINDS:
            raise AutoSKDError(f"search space key 'kind': {kind!r} is not one of: {', '.join(KINDS)}")
        fixed, params = data.get("fixed") or {}, data.get("params")
        if not isinstance(fixed, dict):
            raise AutoSKDError("search space key 'fixed' must be a mapping of key: value")
        if not isinstance(params, dict) or not params:
            raise AutoSKDError("search space key 'params' must be a non-empty mapping of key: {domain: ...}")
        both = sorted(set(fixed) & set(params))
        if both:
            raise AutoSKDError(f"search space key '{both[0]}' is both fixed and tuned; keep one")
        space = cls(name=str(data.get("name") or name), kind=kind, description=str(data.get("description") or ""),
                    fixed={}, params={}, path=path)
        for key, value in fixed.items():
            space._check_key(str(key), "fixed")
            space.fixed[str(key)] = check_method_name(value, f"fixed.{key}") if key == "method" else value
        for key, raw in params.items():
            space._check_key(str(key), "params")
            space.params[str(key)] = Domain.parse(f"params.{key}", raw, method=key == "method")
        if kind == "lm":
            space._check_lm()
        return space

    def _check_lm(self) -> None:
        """An LM space's points must be decoder recipes with options they accept: every method it
        names with every categorical option value and both ends of every numeric option range
        (checked option by option, the space's fixed options set), and a depth of at least one layer."""
        from ..lm.recipes import decoder_method

        depth = self.params.get("student.depth")
        depths = () if depth is None else (depth.low,) if depth.kind == "int" else depth.values
        if depth is not None and (depth.kind not in ("int", "grid", "choice")
                                  or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in depths)):
            raise AutoSKDError("search space key 'params.student.depth' must be whole numbers of layers >= 1 "
                               "(e.g. {int: [2, 6]})")
        if "student.depth" in self.fixed and (isinstance(self.fixed["student.depth"], bool)
                                              or not isinstance(self.fixed["student.depth"], int)
                                              or self.fixed["student.depth"] < 1):
            raise AutoSKDError("search space key 'fixed.student.depth' must be a whole number of layers >= 1")
        if "student.depth" in self.all_keys() and "student.layers" in self.all_keys():
            raise AutoSKDError("search space keys 'student.depth' and 'student.layers' both set the student's layers; "
                               "keep one")
        method_dom = self.params.get("method")
        methods = list(method_dom.values) if method_dom is not None else [self.fixed.get("method", "kd")]
        fixed_opts = {k.split(".", 1)[1]: v for k, v in self.fixed.items() if k.startswith("method_options.")}
        base_key = "params.method" if method_dom is not None else "fixed.method" if "method" in self.fixed else "fixed"
        tried = [(base_key, {})]  # the method with the fixed options alone, then each tuned value
        for key, dom in self.params.items():
            if key.startswith("method_options."):
                ends = dom.values if dom.kind in ("grid", "choice") else (dom.low, dom.high)
                tried += [(f"params.{key}", {key.split(".", 1)[1]: v}) for v in ends]
        for method in methods:
            for where, option in tried:
                try:
                    decoder_method(method, **{**fixed_opts, **option})
                except AutoSKDError as err:
                    raise AutoSKDError(f"search space key '{where}': {err}") from None
                except (TypeError, ValueError) as err:
                    raise AutoSKDError(f"search space key '{where}': method {method!r} refuses {option}: {err}") \
                        from None

    def all_keys(self) -> set[str]:
        return set(self.fixed) | set(self.params)

    def _check_key(self, key: str, where: str) -> None:
        if self.kind == "lm":
            if key.startswith("method_options.") and len(key) > len("method_options."):
                return
            allowed = _lm_keys()
            hint = "LMDistillConfig fields, method_options.<option> (loss, temperature, ...), student.depth, " \
                   "student.layers, student.init"
        elif self.kind == "distill":
            if key.startswith("method_options.") and len(key) > len("method_options."):
                return
            allowed = _distill_keys()
            hint = "DistillConfig fields, method_options.<option>, student.layers, student.init"
        else:
            top, theta = _autoskd_keys()
            if key.startswith("theta.") and key[len("theta."):] in theta:
                return
            if key.startswith("method_options.") and len(key) > len("method_options."):
                return
            allowed = top
            hint = f"SearchConfig fields, theta.<{'|'.join(sorted(theta))}>, method_options.<option>"
        if key not in allowed:
            raise AutoSKDError(f"search space key '{where}.{key}' is unknown for kind '{self.kind}'; use {hint}")

    # ---- what the samplers see
    def to_tune(self) -> dict:
        """Ray Tune's ``param_space`` (grid keys as ``grid_search``)."""
        return {k: d.to_tune() for k, d in self.params.items()}

    def to_optuna(self) -> dict:
        """Optuna distributions (grid keys as categorical: a sampler chooses among them)."""
        return {k: d.to_optuna() for k, d in self.params.items()}

    def grid(self) -> dict[str, list]:
        """Optuna ``GridSampler``'s search space; a continuous range is a one-line error."""
        return {k: d.grid_values() for k, d in self.params.items()}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def trial_values(self, params: dict) -> dict:
        """Fixed values plus one trial's sampled ``params`` (flat ``a.b`` keys kept)."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise AutoSKDError(f"trial parameters {unknown} are not in search space {self.name!r}")
        return {**self.fixed, **params}

    def to_dict(self) -> dict:
        def dom(d: Domain) -> dict:
            return {d.kind: list(d.values) if d.kind in ("grid", "choice") else [d.low, d.high]}

        return {"name": self.name, "kind": self.kind, "description": self.description, "fixed": dict(self.fixed),
                "params": {k: dom(d) for k, d in self.params.items()}}


def check_space_task(space: SearchSpace, lm: bool) -> None:
    """A ``kind: lm`` space runs on an ``lm:<corpus>`` task and the other kinds on classification
    tasks; a mismatch is one line naming the space to use."""
    if lm and space.kind != "lm":
        raise AutoSKDError(f"search space {space.name!r} is kind {space.kind!r} (classification); an lm:<corpus> "
                           "task needs a 'kind: lm' space, e.g. search_spaces/lm.yaml")
    if not lm and space.kind == "lm":
        raise AutoSKDError(f"search space {space.name!r} is kind 'lm' (decoder LMs); give it a task lm:<corpus> and "
                           "an LM team (e.g. teams/smollm2.yaml), or use a classification space such as "
                           "search_spaces/kd-hparams.yaml")


def load_space(path: str | Path) -> SearchSpace:
    """Parse a search-space YAML file (a bare name looks in the bundled ``search_spaces/``)."""
    p = Path(path)
    if not p.exists() and not p.suffix and (SPACES_DIR / f"{p}.yaml").exists():
        p = SPACES_DIR / f"{p}.yaml"
    if not p.exists():
        raise AutoSKDError(f"search space file {str(path)!r} not found; pass a YAML file such as "
                           "search_spaces/kd-hparams.yaml")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0]
        raise AutoSKDError(f"search space {p} is not valid YAML: {first}") from None
    return SearchSpace.from_dict(data, name=p.stem, path=str(p))
