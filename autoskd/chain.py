"""Teacher-assistant chains: teacher -> assistant(s) -> student on the one engine.

TAKD (``method="takd"``): each hop distils the previous hop's trained model into the next,
smaller one. DGKD (``method="dgkd"``): every earlier model of the chain (the teacher and
each trained assistant) teaches each hop at once, with random teacher dropout. Every hop is
one :func:`autoskd.pipeline.distill` run; assistants are the team's student spec with
another layer count (same source and initialisation). A finished hop is reloaded from its
folder, so rerunning the same command resumes the chain; its ``result.json`` carries what it was
computed from (the chain's config, the team, the task, the hop and the hops before it: see
:mod:`autoskd.rerun`), and a hop of another configuration stops the rerun in one line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .atomic import write_json
from .errors import AutoSKDError
from .pipeline import DEFAULT_CACHE, DistillConfig, distill, team_identity
from .rerun import check_stamp, fingerprint


@dataclass
class Hop:
    name: str
    layers: int | None
    teachers: list[str]
    dev_acc: float
    test_acc: float
    seconds: float
    resumed: bool = False


@dataclass
class ChainOutcome:
    hops: list[Hop] = field(default_factory=list)
    student: nn.Module | None = None

    def summary(self) -> dict:
        return {"hops": [dataclasses.asdict(h) for h in self.hops]}


def _hop_team(team, teachers: dict[str, nn.Module], dev: dict[str, float]):
    view = copy.copy(team)
    view.teachers, view.dev_accuracy, view.fingerprints = dict(teachers), dict(dev), {}
    return view


def _build_assistant(team, task, layers: int, seed: int) -> nn.Module:
    from .models.loading import load_classifier

    spec = team.student_spec
    if isinstance(spec, nn.Module) or getattr(spec, "source", None) is None:
        raise AutoSKDError("a chain builds assistants from the team's student spec; give the student a source "
                           "(e.g. source: minilm-l6) in the team YAML")
    init = "pretrained" if spec.init == "truncated-teacher" else spec.init
    model = load_classifier(spec.source, num_labels=task.num_labels, layers=layers, init=init, seed=seed)
    model.train()
    return model


def run_chain(team, task, config: DistillConfig, assistants: list[int], *, out_dir: str | Path,
              cache_dir: str | Path = DEFAULT_CACHE, progress: bool = True) -> ChainOutcome:
    """Train ``teacher -> assistants (layer counts, deepest first) -> student``."""
    from .models.loading import load_classifier

    if config.method not in ("takd", "dgkd"):
        raise AutoSKDError(f"a chain runs 'takd' or 'dgkd', not {config.method!r}")
    if any(int(a) <= 0 for a in assistants):
        raise AutoSKDError(f"assistant layer counts must be positive (got {assistants})")
    out = Path(out_dir)
    first = config.teacher or max(team.dev_accuracy, key=team.dev_accuracy.get)
    if first not in team.teachers:
        raise AutoSKDError(f"teacher {first!r} is not in the team; choose one of: {', '.join(team.teachers)}")
    earlier: dict[str, nn.Module] = {first: team.teachers[first]}
    dev = {first: team.dev_accuracy.get(first, 0.0)}
    outcome = ChainOutcome()
    hops = [(f"assistant-L{k}", int(k)) for k in assistants] + [("student", None)]
    base = {"team": team_identity(team), "teacher": first,
            "task": {split: task.fingerprint(split) for split in (config.train_split, "dev", "test")}}
    done: dict[str, str] = {}  # hop name -> fingerprint of what it was computed from
    for i, (name, layers) in enumerate(hops):
        hop_dir = out / f"hop{i}-{name}"
        speakers = dict(earlier) if config.method == "dgkd" else {list(earlier)[-1]: list(earlier.values())[-1]}
        cfg = dataclasses.replace(config, teacher=list(speakers)[-1], teachers=list(speakers))
        identity = {**base, "config": cfg.to_dict(), "hop": name, "layers": layers,
                    "earlier": {n: done[n] for n in speakers if n in done}}
        result_file = hop_dir / "result.json"
        if result_file.exists():  # finished earlier: reload and go on, if it is this chain's hop
            saved = json.loads(result_file.read_text())
            check_stamp(saved, identity, f"finished hop {hop_dir}", out)
            model = load_classifier(str(hop_dir / "student"), num_labels=task.num_labels)  # with its own head
            hop = Hop(name, layers, list(speakers), saved["dev_acc"], saved["test_acc"], saved["seconds"], True)
        else:
            student = team.build_student(task, seed=config.seed) if layers is None else \
                _build_assistant(team, task, layers, config.seed)
            result = distill(_hop_team(team, speakers, dev), task, cfg, out_dir=hop_dir, cache_dir=cache_dir,
                             progress=progress, student=student, identity=identity)
            model = result.student
            hop = Hop(name, layers, list(speakers), result.dev_acc, result.test_acc, round(result.result.seconds, 2))
        done[name] = fingerprint(identity)
        outcome.hops.append(hop)
        earlier[name] = model.eval()
        dev[name] = hop.dev_acc
        outcome.student = model
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "chain.json", {"method": config.method, "teacher": first, **outcome.summary()})
    return outcome
