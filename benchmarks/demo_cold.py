"""`make demo` from a fresh clone, timed as a new user runs it: set-up, then the quick search.

Clones the committed HEAD into a temporary folder (no ``.venv``, no team cache, no runs), then
times ``make setup`` (venv, pip installs) and ``make demo`` (builds the ladder team: fine-tunes
five teachers; the quick AutoSKD search with its candidates and baselines) separately. pip's own
download cache is whatever this machine has (say so when you compare). Run it on a quiet machine:
the figure is wall time. Writes ``benchmarks/results/demo_cold.json``.

    python benchmarks/demo_cold.py [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import write_result  # noqa: E402

TARGET_MINUTES = 15.0


def timed(cmd: list[str], cwd: Path, log: Path) -> float:
    """Run ``cmd`` in ``cwd`` with its output in ``log``; return its wall seconds (raise on failure)."""
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                              env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit {proc.returncode}; see {log}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = ap.parse_args()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="autoskd-demo-"))
    clone = work / "autoskd"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    setup_s = timed(["make", "setup"], clone, work / "setup.log")
    demo_s = timed(["make", "demo"], clone, work / "demo.log")
    summary = json.loads((clone / "runs" / "demo" / "summary.json").read_text())
    total_min = (setup_s + demo_s) / 60
    result = {"commit": head, "setup_seconds": round(setup_s, 1), "demo_seconds": round(demo_s, 1),
              "total_minutes": round(total_min, 2), "target_minutes": TARGET_MINUTES,
              "met": total_min <= TARGET_MINUTES, "best": summary["best"],
              "note": "fresh git clone, empty .venv and team cache; pip's download cache as on this machine"}
    path = write_result("demo_cold", result)
    print(f"make setup {setup_s / 60:.1f} min + make demo {demo_s / 60:.1f} min = {total_min:.1f} min "
          f"(target {TARGET_MINUTES:g}) -> {path}")
    if args.keep:
        print(f"clone kept at {clone}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
