"""A stand-in for the real trial runner (``TrialSpec.runner = "fake_runner:run"``).

Importable by Ray workers (a module, not a closure): :mod:`autoskd.search.trials` puts this
folder on the workers' PYTHONPATH. Trains nothing; every call appends the arm's name to
``<root>/calls.log`` so tests can count runs across processes. Arms whose name contains
``boom`` raise.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def calls(root) -> list[str]:
    path = Path(root) / "calls.log"
    return path.read_text().split() if path.exists() else []


def run(spec, arm, out_dir: Path) -> dict:
    fd = os.open(Path(spec.root) / "calls.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{arm.name}\n".encode())
    finally:
        os.close(fd)
    if "boom" in arm.name:
        raise RuntimeError(f"fake failure in {arm.name}\nsecond line of the message")
    once = Path(spec.root) / f"{arm.name}.killed"
    if "kill-once" in arm.name and not once.exists():  # the worker dies (kill -9) on the first try
        once.write_text(str(os.getpid()))
        os.kill(os.getpid(), 9)
    score = int(hashlib.sha1(arm.name.encode()).hexdigest()[:6], 16) / 0xFFFFFF
    (Path(out_dir) / "student").mkdir(parents=True, exist_ok=True)
    return {"dev_acc": 0.5 + 0.4 * score, "test_acc": 0.5 + 0.3 * score, "steps": 10,
            "teacher_counts": {"t0": 5, "t1": 5} if arm.theta else None, "pid": os.getpid(),
            "omp": os.environ.get("OMP_NUM_THREADS")}
