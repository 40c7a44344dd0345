"""From an experiment as written (a file, a command's flags, ``--set`` edits) to the complete
resolved experiment: every default filled in, the team, stage plan, search space and DeepSpeed
config written inline, the search preset expanded.

Everything is checked here, before any model or data loads, and every problem is collected so
one run of ``autoskd run --dry-run`` names them all (one line: ``2 problems: ... | ...``).
The resolved mapping is what runs, what is written beside the outputs as ``experiment.yaml``,
and what the fingerprint hashes; resolving it again gives it back unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..errors import AutoSKDError
from . import sections as S
from .schema import Invalid, check_section, one_of, unknown_key
from .teams import DEFAULT_LM_TEAM, DEFAULT_TEAM, is_lm_team, resolve_team, teacher_names

LM_PREFIX = "lm:"


def is_lm_task(name: Any) -> bool:
    return str(name).startswith(LM_PREFIX)


def resolve_experiment(raw: Any, source: str | None = None) -> dict:
    """The complete, checked experiment; one :class:`AutoSKDError` naming every problem.
    ``source`` (a file name) starts the message."""
    problems: list[str] = []
    resolved = _resolve(raw, problems)
    if problems:
        where = f"{source}: " if source else ""
        if len(problems) == 1:
            raise AutoSKDError(f"{where}{problems[0]}")
        raise AutoSKDError(f"{where}{len(problems)} problems in the experiment: " + " | ".join(problems))
    return resolved


def _resolve(raw: Any, problems: list[str]) -> dict:
    if not isinstance(raw, Mapping):
        raise AutoSKDError(f"an experiment must be a mapping (kind, team, task, ...), got {raw!r}")
    raw = dict(raw)
    try:
        kind = one_of(*S.KINDS)(raw.get("kind", "distill"))
    except Invalid as err:
        raise AutoSKDError(f"kind {err}") from None
    task_raw = raw.get("task")
    if isinstance(task_raw, str):  # ``task: rotten_tomatoes`` is ``task: {name: rotten_tomatoes}``
        task_raw = {"name": task_raw}
    lm = isinstance(task_raw, Mapping) and is_lm_task(task_raw.get("name", ""))
    if kind == "distill" and not lm:
        kind, raw = _stage_plan_from_distill(raw, problems)

    for key in raw:
        if key not in S.TOP_KEYS:
            problems.append(unknown_key(key, list(S.TOP_KEYS), ""))
    for section in S.SECTIONS:
        if section != kind and section in raw:
            problems.append(f"section '{section}' does not apply to kind '{kind}' (kind: {section} reads it)")
    if lm and kind not in ("distill", "search", "tune"):
        problems.append(f"kind '{kind}' needs a classification task; a language-model task (lm:...) runs with "
                        "kind: distill, search or tune")
    top = check_section({k: raw[k] for k in ("seed", "out", "cache_dir", "progress") if k in raw},
                        S.top_table(kind), "", problems)
    task = _task(task_raw, lm, problems)
    team = _team(raw.get("team"), lm, problems)
    out: dict = {"kind": kind, "task": task, "seed": top["seed"], "out": top["out"]}
    section = raw.get(kind)
    if kind == "distill":
        out["distill"] = _distill(section, team, lm, problems)
    elif kind == "stages":
        out["stages"] = _stages(section, team, problems)
    elif kind == "search":
        out["search"] = _search(section, task, task_raw if isinstance(task_raw, Mapping) else {}, problems)
    elif kind == "tune":
        out["tune"] = _tune(section, problems, lm)
        if out["out"] is None:
            space = out["tune"]["space"]
            name = space.get("name", "space") if isinstance(space, Mapping) else "space"
            out["out"] = f"runs/tune/{out['tune']['study'] or name}"
    else:
        out["chain"] = _chain(section, team, problems)
    if kind in S.SCALED and (not lm or kind == "distill"):
        out["scale"] = _scale(raw.get("scale"), kind, problems)
        if lm and out["scale"]["deepspeed"] is not None and out["distill"].get("precision", "fp32") != "fp32":
            problems.append("distill.precision applies to one-process runs; under DeepSpeed set bf16 or fp16 in "
                            "the DeepSpeed config (\"bf16\": {\"enabled\": true}) and drop precision")
    elif "scale" in raw:
        problems.append("scale does not apply here (DeepSpeed and tensor parallelism serve distill, on "
                        "classification and language-model tasks, and classification stages and search)")
    out["team"] = team
    out["cache_dir"], out["progress"] = top["cache_dir"], top["progress"]
    return out


# ---------------------------------------------------------------------------------------------- pieces
def _other_keys(given: Any, here: dict, there: dict, where: str, what: str, problems: list[str]) -> tuple:
    """Keys that belong to the other task kind's table: one clear line each, not 'unknown key'."""
    if not isinstance(given, Mapping):
        return ()
    misplaced = tuple(k for k in given if k not in here and k in there)
    for key in misplaced:
        problems.append(f"{where}.{key} {what}")
    return misplaced


def _task(given: Any, lm: bool, problems: list[str]) -> dict:
    here, there = S.task_table(lm), S.task_table(not lm)
    what = ("does not apply to a language-model task" if lm
            else "applies to language-model tasks (task name lm:<corpus>)")
    skip = _other_keys(given, here, there, "task", what, problems)
    task = check_section(given, here, "task", problems, skip=skip)
    if lm and not str(task["name"])[len(LM_PREFIX):].strip():
        problems.append("task: lm: needs a corpus after the colon, e.g. lm:rotten_tomatoes or lm:docs.txt")
    return task


def _team(ref: Any, lm: bool, problems: list[str]) -> dict:
    ref = ref if ref is not None else (DEFAULT_LM_TEAM if lm else DEFAULT_TEAM)
    try:
        team = resolve_team(ref)
    except AutoSKDError as err:
        problems.append(f"team: {err}")
        return {}
    if lm and not is_lm_team(team):
        problems.append(f"team '{team['name']}' is a classification team; a language-model task needs a team of "
                        "causal LMs (kind: lm), e.g. teams/smollm2.yaml")
    elif not lm and is_lm_team(team):
        problems.append(f"team '{team['name']}' is a language-model team (kind: lm); give it a task lm:<corpus>, "
                        "or use a classification team such as teams/minilm-ladder.yaml")
    return team


def _check_teachers(team: dict, where: str, teacher: str | None, teachers: list[str] | None,
                    problems: list[str]) -> None:
    if not team or (teacher is None and not teachers):
        return
    try:
        known = teacher_names(team)
    except AutoSKDError:  # already reported with the team
        return
    for name, key in ([(teacher, "teacher")] if teacher else []) + [(t, "teachers") for t in teachers or []]:
        if name not in known:
            problems.append(f"{where}.{key} {name!r} is not in team {team['name']}; choose one of: {', '.join(known)}")


def _distill(given: Any, team: dict, lm: bool, problems: list[str]) -> dict:
    here, there = S.distill_table(lm), S.distill_table(not lm)
    what = ("does not apply to a language-model task" if lm
            else "applies to language-model tasks (task name lm:<corpus>)")
    skip = _other_keys(given, here, there, "distill", what, problems)
    d = check_section(given, here, "distill", problems, skip=skip)
    try:
        if lm:
            from ..lm.recipes import decoder_method

            decoder_method(d["method"], **d["options"])
        else:
            from ..methods import get_method

            get_method(d["method"], **d["options"])
    except AutoSKDError as err:
        problems.append(f"distill: {err}")
    except TypeError as err:  # a constructor refusing an option value's type
        problems.append(f"distill.options: {err}")
    _check_teachers(team, "distill", d["teacher"], d.get("teachers"), problems)
    return d


def _stage_plan_from_distill(raw: dict, problems: list[str]) -> tuple[str, dict]:
    """``distill.method: plan.yaml`` (``autoskd distill --method plan.yaml``) is a stage plan:
    kind ``stages``, with the keys a plan shares moved over and the others refused."""
    from ..engine.stages import is_stage_plan

    section = raw.get("distill")
    if not isinstance(section, Mapping) or not is_stage_plan(section.get("method")):
        return "distill", raw
    section = dict(section)
    stages = {"plan": section.pop("method")}
    for key in ("teacher", "teachers", "batch_size", "max_length"):
        if key in section:
            stages[key] = section.pop(key)
    if section.pop("options", None):
        problems.append("--option (distill.options) does not apply to a stage plan; give each stage its options: "
                        "in the YAML")
    for key in section:
        problems.append(f"distill.{key} does not apply to a stage plan; set it per stage in the plan")
    raw = {k: v for k, v in raw.items() if k != "distill"}
    return "stages", {**raw, "kind": "stages", "stages": stages}


def _stages(given: Any, team: dict, problems: list[str]) -> dict:
    from ..engine.stages import load_stage_plan

    s = check_section(given, S.stages_table(), "stages", problems)
    plan = s["plan"]
    if plan is None:
        problems.append("stages.plan is missing; give a stage-plan file or a list of stages")
        return s
    try:
        load_stage_plan(plan)  # a file is parsed from the file, so its messages name it
        s["plan"] = _plan_entries(plan)
    except AutoSKDError as err:
        problems.append(str(err))
    _check_teachers(team, "stages", s["teacher"], s["teachers"], problems)
    return s


def _plan_entries(plan: Any) -> list:
    """The plan's list of stage entries (a file's, or a mapping's ``stages``)."""
    if isinstance(plan, (str, Path)):
        import yaml

        plan = yaml.safe_load(Path(plan).read_text(encoding="utf-8"))
    if isinstance(plan, Mapping):
        plan = plan.get("stages")
    return [dict(entry) for entry in plan]


def _search(given: Any, task: dict, task_raw: Mapping, problems: list[str]) -> dict:
    from ..search.lm_search import DEFAULT_CANDIDATE_POLICY
    from ..search.run import SearchConfig
    from ..search.theta_step import ThetaConfig

    given = dict(given) if isinstance(given, Mapping) else given
    default = "lm-quick" if is_lm_task(task.get("name", "")) else "quick"  # LM teams get LM θ settings
    wanted = given.get("preset", default) if isinstance(given, Mapping) else default
    preset = wanted if wanted in _presets() else default  # a bad name is reported with the section below
    base = SearchConfig.from_preset(preset).to_dict()
    base["candidate_policy"] = DEFAULT_CANDIDATE_POLICY if is_lm_task(task.get("name", "")) else "sampled"
    if isinstance(given, Mapping):  # nested settings merge key by key with the preset's
        for key in ("theta", "method_options"):
            if isinstance(given.get(key), Mapping):
                given[key] = {**base[key], **given[key]}
    s = check_section(given, S.search_table(base), "search", problems)
    s["theta"] = check_section(s["theta"], S.theta_table(base["theta"]), "search.theta", problems)
    for key in ("max_train", "max_eval"):  # the preset's row limits unless the task sets its own
        if task_raw.get(key) is None:
            task[key] = base[key]
    if s.get("candidate_policy") == "mixture" and not is_lm_task(task.get("name", "")):
        problems.append("search.candidate_policy: mixture trains on mixed next-token distributions (a language-"
                        "model task, lm:...); a classifier search samples its candidates: drop the setting")
    try:  # the classifier's settings (candidate_policy is the LM search's)
        SearchConfig(**{k: v for k, v in s.items() if k not in ("theta", "candidate_policy")},
                     theta=ThetaConfig(**s["theta"]))
    except AutoSKDError as err:
        problems.append(f"search: {err}")
    return s


def _presets() -> tuple[str, ...]:
    from ..search.presets import PRESETS

    return tuple(PRESETS)


def _tune(given: Any, problems: list[str], lm: bool = False) -> dict:
    from ..fanout.space import SearchSpace, check_space_task, load_space
    from ..fanout.tune import TuneSettings

    t = check_section(given, S.tune_table(), "tune", problems)
    space = t["space"]
    if space is None:
        problems.append("tune.space is missing; give a search-space file (e.g. search_spaces/kd-hparams.yaml) "
                        "or its mapping")
        return t
    try:
        parsed = (SearchSpace.from_dict(dict(space), name=str(space.get("name") or "space"))
                  if isinstance(space, Mapping) else load_space(str(space)))
        t["space"] = parsed.to_dict()
        check_space_task(parsed, lm)  # a kind: lm space on an lm: task, the others on classification
        settings = TuneSettings(**{k: v for k, v in t.items() if k not in ("space", "batch_size")})
        settings.check(parsed)
        t["objective2"] = settings.objective2  # nsga2's default second objective, written down
    except AutoSKDError as err:
        problems.append(str(err))
    return t


def _chain(given: Any, team: dict, problems: list[str]) -> dict:
    from ..methods import get_method

    c = check_section(given, S.chain_table(), "chain", problems)
    try:
        get_method(c["method"], **c["options"])
    except AutoSKDError as err:
        problems.append(f"chain: {err}")
    _check_teachers(team, "chain", c["teacher"], None, problems)
    return c


def _scale(given: Any, kind: str, problems: list[str]) -> dict:
    s = check_section(given, S.scale_table(kind), "scale", problems)
    if s["deepspeed"] is not None:
        from ..engine.deepspeed_backend import load_deepspeed_config

        try:
            s["deepspeed"] = load_deepspeed_config(s["deepspeed"])
        except AutoSKDError as err:
            problems.append(f"scale.deepspeed: {err}")
    return s
