"""Shared helpers for the benchmark scripts: write a result JSON with machine info."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # torch missing: still write the result
        info["torch"] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:
        pass
    return info


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (result + ``machine``); return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, **result, "machine": machine_info()}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def start_ray() -> float:
    """One local Ray (2 CPUs, 127.0.0.1) for every run of a benchmark; returns its start time (s)."""
    from autoskd.ray_runtime import ensure_ray_env

    ensure_ray_env()
    import ray

    root = Path(__file__).resolve().parent.parent
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             object_store_memory=256 * 1024 ** 2, logging_level="warning",
             runtime_env={"env_vars": {"PYTHONPATH": str(root), "TOKENIZERS_PARALLELISM": "false",
                                       "RAY_CHDIR_TO_TRIAL_DIR": "0", "OMP_NUM_THREADS": "1"}})
    return round(time.perf_counter() - start, 1)
