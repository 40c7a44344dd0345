"""Teacher teams: a YAML spec (:class:`TeamSpec`) and the Python object (:class:`TeacherTeam`).

A team is one student spec and a list of teachers. ``TeacherTeam.build(task)`` fine-tunes every
teacher given as a spec on the task's full training set (through the engine's one training loop,
method ``finetune``), evaluates it on ``dev``, and caches the result under
``<cache_dir>/<teacher>-<hash12>``. The hash covers everything the weights depend on (the
teacher's spec, the training and dev data, ``max_length``, the seed and the tokenizer), so a
rerun reuses the cache and a changed spec rebuilds only the teachers it changed.

The default team (``teams/minilm-ladder.yaml``) cuts teachers of 1, 2, 3, 4 and 6 layers out of
all-MiniLM-L6-v2 for a 2-layer student, so the team holds members weaker and stronger than the
student (AutoSKDBERT, appendix A)::

    name: minilm-ladder
    student: {source: minilm-l6, layers: 2, init: pretrained}
    teachers:
      - {name: minilm-L1, source: minilm-l6, layers: 1, finetune: {epochs: 3, lr: 1e-4}}
      ...
    max_length: 64

One module per job: :mod:`.spec` (the file format), :mod:`.validation`, :mod:`.probe`
(tokenizer probing), :mod:`.cache` (cache keys and entries), :mod:`.finetune`,
:mod:`.evaluation`, :mod:`.report` (the table), :mod:`.student` (building the student) and
:mod:`.core` (the :class:`TeacherTeam` that orders them).
"""

from .cache import DEFAULT_CACHE_DIR
from .core import Member, TeacherTeam
from .probe import PROBE_SENTENCE
from .spec import FinetuneSettings, ModelSpec, TeamSpec, bundled_teams

__all__ = ["TeacherTeam", "TeamSpec", "ModelSpec", "FinetuneSettings", "bundled_teams", "Member",
           "DEFAULT_CACHE_DIR", "PROBE_SENTENCE"]
