"""autoskd: find the best way to distil a team of teacher language models into a small student.

The main entry points:

- :func:`autoskd.data.load_task` - a labelled text task with train/val/dev/test splits;
- :class:`autoskd.team.TeacherTeam` - the student and its teachers (HF ids, local paths, modules);
- :func:`autoskd.pipeline.distill` - one distillation run with a named method;
- :func:`autoskd.search.run.run_search` - the AutoSKD teacher search;
- :class:`autoskd.engine.trainer.Distiller` - the one training loop everything runs on.
"""

from .errors import AutoSKDError

__version__ = "0.1.0"

__all__ = ["AutoSKDError", "__version__"]
