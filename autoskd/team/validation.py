"""Team validation: every mistake in a team that cannot work on a task, found before any training.

Fine-tuning a team takes minutes to hours, so everything that can be checked from configs and
tokenizers is checked first, each failure one :class:`~autoskd.errors.AutoSKDError` line naming
the member and the fix: tokenizers that differ from the team's, given modules with the wrong
label count or too few token embeddings, ``layers`` a model does not have, a truncated-teacher
student that does not fit its teacher.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import AutoSKDError
from ..models.loading import (check_layers, config_num_layers, count_layers, hidden_size, load_config,
                              load_tokenizer, num_labels_of, resolve_source)
from .probe import probe_num_labels, tokenizer_difference
from .spec import ModelSpec

OWN_TOKENIZER_HINT = ("or give this teacher 'tokenizer: own' so it tokenises the text itself "
                      "(logit-level methods only)")


def validate_team(team, task) -> None:
    """Raise :class:`AutoSKDError` for team input that cannot work on ``task``."""
    tok = team.tokenizer
    ref_source = team._tokenizer_reference()
    tokenizers: dict[str, Any] = {}
    configs: dict[str, Any] = {}

    def config_of(source: str):
        resolved = resolve_source(source)
        if resolved not in configs:
            configs[resolved] = load_config(source)
        return configs[resolved]

    members = [("student", "the student", team.student_spec)] if team.student_spec is not None else []
    members += [(n, f"teacher '{n}'", m) for n, m in team.teacher_specs.items()]
    for key, label, member in members:
        if isinstance(member, nn.Module):
            check_module(label, member, task, tok)
            continue
        if member is None:
            continue
        if member.source is None:
            continue
        if member.tokenizer is not None:
            team.teacher_tokenizer(key)  # it must load; any vocabulary is fine
        elif not (isinstance(ref_source, str) and resolve_source(ref_source) == resolve_source(member.source)):
            resolved = resolve_source(member.source)
            if resolved not in tokenizers:
                tokenizers[resolved] = load_tokenizer(member.source)
            detail = tokenizer_difference(tokenizers[resolved], tok)
            if detail is not None:
                against = "the team's tokenizer" if team._tokenizer_source is not None else "the student"
                hint = f", {OWN_TOKENIZER_HINT}" if key != "student" else ""
                raise AutoSKDError(f"{label} uses a different tokenizer ({detail}) than {against}; "
                                   f"all team members must share one tokenizer{hint}")
        if member.layers is not None:
            available = config_num_layers(config_of(member.source))
            try:
                check_layers(available, member.layers)
            except AutoSKDError as err:
                raise AutoSKDError(f"{label}: {err}") from None
    student = team.student_spec
    if isinstance(student, ModelSpec) and student.init == "truncated-teacher":
        check_truncated_teacher(team, student, config_of)


def check_module(label: str, module: nn.Module, task, tok) -> None:
    """A given ``nn.Module`` member: right label count, enough token embeddings."""
    expected = task.num_labels
    got = num_labels_of(module)
    if got is None:
        got = probe_num_labels(module, tok)
    if got is not None and got != expected:
        fix = ("fine-tune it on this task first, or pass a ModelSpec so autoskd fine-tunes it"
               if label != "the student" else "build it with num_labels matching the task")
        raise AutoSKDError(f"{label} predicts {got} labels but task '{task.name}' has {expected}; {fix}")
    get = getattr(module, "get_input_embeddings", None)
    emb = None
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if isinstance(emb, nn.Embedding) and emb.num_embeddings < len(tok):
        raise AutoSKDError(f"{label} has {emb.num_embeddings} token embeddings but the team tokenizer has "
                           f"{len(tok)} tokens; all team members must share one tokenizer")


def check_truncated_teacher(team, student: ModelSpec, config_of) -> None:
    """A student copied from a teacher needs the teacher's width and at most its depth."""
    teacher = team.teacher_specs[student.teacher]
    if isinstance(teacher, nn.Module):
        t_layers = count_layers(teacher)
        t_width = hidden_size(teacher)
    else:
        if teacher.tokenizer is not None:
            raise AutoSKDError(f"the student copies teacher '{student.teacher}', which uses its own tokenizer; "
                               "copy a teacher that shares the student's tokenizer, or use init: pretrained")
        cfg = config_of(teacher.source)
        t_layers = teacher.layers or config_num_layers(cfg)
        t_width = getattr(cfg, "hidden_size", None)
    if student.source is not None:
        cfg = config_of(student.source)
        s_width = getattr(cfg, "hidden_size", None)
        s_layers = student.layers or config_num_layers(cfg)
        if s_width is not None and t_width is not None and s_width != t_width:
            raise AutoSKDError(f"the student and teacher '{student.teacher}' widths differ ({s_width} vs "
                               f"{t_width}); truncated-teacher init needs equal widths, use init: pretrained")
    else:
        s_layers = student.layers or t_layers
    if t_layers is not None and s_layers is not None and s_layers > t_layers:
        raise AutoSKDError(f"the student has {s_layers} layers but its teacher '{student.teacher}' only "
                           f"{t_layers}; truncated-teacher init needs a teacher at least as deep")
