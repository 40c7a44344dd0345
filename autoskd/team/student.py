"""Building the team's student: the same starting weights every time it is asked for.

Every search candidate, baseline and ``distill`` run starts from ``build_student``, so runs
differ only in how they distil, never in where the student started.
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import AutoSKDError
from ..models.loading import init_from_teacher, load_classifier, num_labels_of, truncate_layers
from .finetune import set_label_names


def build_student(team, task, seed: int = 0) -> nn.Module:
    """A fresh student per the team's student spec (trainable, train mode).

    ``pretrained``/``random`` load from the student's source; ``truncated-teacher`` copies the
    built teacher named by the spec (call ``build`` first). A student given as an ``nn.Module``
    is deep-copied, so every call starts from the same weights.
    """
    spec = team.student_spec
    if spec is None:
        raise AutoSKDError("the team has no student; pass student=<ModelSpec, source or nn.Module>")
    if isinstance(spec, nn.Module):
        model = copy.deepcopy(spec)
    elif spec.init == "truncated-teacher":
        teacher = team.teachers.get(spec.teacher)
        if teacher is None:
            raise AutoSKDError(f"the student copies teacher '{spec.teacher}', which is not built yet; "
                               "call team.build(task) first")
        if spec.source is None:
            model = copy.deepcopy(teacher)
            if spec.layers is not None:
                truncate_layers(model, spec.layers)
        else:
            model = load_classifier(spec.source, num_labels=task.num_labels, layers=spec.layers,
                                    init="random", seed=seed)
            init_from_teacher(model, teacher)
    else:
        model = load_classifier(spec.source, num_labels=task.num_labels, layers=spec.layers, init=spec.init,
                                seed=seed)
    got = num_labels_of(model)
    if got is not None and got != task.num_labels:
        raise AutoSKDError(f"the student predicts {got} labels but task '{task.name}' has {task.num_labels}; "
                           "build it with num_labels matching the task")
    set_label_names(model, list(task.label_names))
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model
