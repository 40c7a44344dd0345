"""Task data: loading and splitting (tasks.py), tokenisation and batching (collate.py)."""

from autoskd.data.collate import (
    DynamicPaddingCollator,
    TokenizedSplit,
    make_loader,
    tokenize_split,
    unlabelled_split,
)
from autoskd.data.tasks import SPLITS, TASKS, TaskData, builtin_tasks, load_task

__all__ = [
    "SPLITS",
    "TASKS",
    "TaskData",
    "builtin_tasks",
    "load_task",
    "DynamicPaddingCollator",
    "TokenizedSplit",
    "make_loader",
    "tokenize_split",
    "unlabelled_split",
]
