"""The Ray runtime every fan-out path shares: the environment Ray needs on this machine, the
environment of a worker process, a session that starts a local Ray on 127.0.0.1 or joins a
cluster, and what a Ray Tune run shows (a progress bar, no INFO chatter).

AutoSKD's arms (:mod:`autoskd.search.trials`), ``autoskd tune``'s trials (:mod:`autoskd.fanout.tune`)
and the multi-process θ search (:mod:`autoskd.search.ray_parallel`) all start Ray through
:func:`ray_session`, so a worker sees the same checkout, thread count and settings whichever path
launched it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .errors import AutoSKDError

__all__ = ["ensure_ray_env", "module_root", "worker_env", "ray_session", "REPO_ROOT", "progress_callback",
           "quiet_tune_logs", "check_ray_address", "probe_tcp", "probe_grpc", "PROBE_TIMEOUT"]

#: seconds a cluster address may take to accept a TCP connection before it is reported unreachable
PROBE_TIMEOUT = 3.0

#: the folder that holds the ``autoskd`` package (put on workers' PYTHONPATH)
REPO_ROOT = Path(__file__).resolve().parents[1]


def ensure_ray_env() -> None:
    """Environment Ray needs here; call before ``import ray`` (no usage stats, no OSX cluster)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 then means quiet (no config box)
    # Ray 2.5x+ turns token authentication on for every new local cluster (a token in
    # ~/.ray/auth_token) and says so at WARNING on each start. That is the setting we want, so the
    # notice is noise on every local run; an auth failure is still raised as an error.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def module_root(module_name: str) -> str | None:
    """The sys.path entry a module was imported from (so workers can import it too)."""
    mod = sys.modules.get(module_name)
    file = getattr(mod, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve().parent
    for _ in range(module_name.count(".") + (1 if Path(file).name == "__init__.py" else 0)):
        path = path.parent
    return str(path)


def worker_env(threads: float = 1, extra_paths: tuple[str | None, ...] = ()) -> dict[str, str]:
    """Environment of a Ray worker process: this checkout (and ``extra_paths``) importable, and
    ``threads`` torch/MKL threads."""
    paths = [str(REPO_ROOT), *extra_paths, *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    seen: list[str] = []
    for p in paths:
        if p and p not in seen:
            seen.append(p)
    n = str(max(1, int(threads)))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(seen), "RAY_CHDIR_TO_TRIAL_DIR": "0"}


def _why_not(err: OSError, timeout: float) -> str:
    """A failed connection, said the way a user can act on."""
    if isinstance(err, socket.timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(err, socket.gaierror):
        return f"unknown host ({err.strerror or err})"
    return err.strerror or str(err)


def probe_tcp(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when ``host:port`` accepts a TCP connection within ``timeout`` seconds, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return _why_not(err, timeout)


#: an HTTP/2 client's connection preface and an empty SETTINGS frame: a gRPC server (Ray Client,
#: the GCS) answers with a SETTINGS frame of its own
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def probe_grpc(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when ``host:port`` speaks gRPC (answers an HTTP/2 preface with SETTINGS) within
    ``timeout`` seconds, else why not. A cluster with TLS (``RAY_USE_TLS``) is only connected to."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return None
            conn.settimeout(timeout)
            conn.sendall(_H2_PREFACE)
            head = conn.recv(9)
    except OSError as err:
        return _why_not(err, timeout)
    if len(head) >= 4 and head[3] == 4:  # a SETTINGS frame
        return None
    return "it answers, but not as a Ray (gRPC) server: another service on that port?"


def _host_port(text: str, default_port: int | None) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port); ``ValueError`` when it is not one."""
    host, sep, port = text.rpartition(":") if text.count(":") == 1 or text.startswith("[") else ("", "", "")
    if not sep:
        if default_port is None or not text or ":" in text:
            raise ValueError(text)
        host, port = text, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(text)
    return host, int(port)


def _current_cluster() -> str | None:
    """The address ``ray start`` left for ``address="auto"`` (RAY_ADDRESS first), if any."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return env
    base = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        return base.read_text().strip() or None
    except OSError:
        return None


def check_ray_address(address: str | None, timeout: float = PROBE_TIMEOUT) -> str | None:
    """A Ray address as ``ray_session`` takes it, checked before Ray is started or any work is
    done: None or ``local`` (a local Ray), ``auto`` (the cluster ``ray start`` or ``ray job submit``
    set up here), ``ray://host:port`` (Ray Client, usually port 10001) or ``host:port`` (the head's
    GCS, usually 6379). The cluster must answer as a gRPC server within ``timeout`` seconds, so an
    unreachable one (or another service on that port) fails in seconds with one line instead of
    Ray's own timeout. Returns the address as given."""
    if address is None or address == "local":
        return address
    text = str(address).strip()
    target = text
    if text == "auto":
        target = _current_cluster()
        shown = f"auto (= {target})" if target else text
        if target is None:
            raise AutoSKDError("--address auto: no running Ray cluster found here (no RAY_ADDRESS, no `ray start`); "
                               "start one with `ray start --head`, give ray://<head>:10001, or leave --address out "
                               "for a local Ray")
        if target in ("auto", "local"):
            return text
        text = shown
    scheme, sep, rest = target.partition("://")
    if sep and scheme != "ray":
        raise AutoSKDError(f"--address {text}: not a Ray address; use ray://<head>:10001 (Ray Client), "
                           "<head>:6379 (the head's GCS), auto or local")
    try:
        host, port = _host_port(rest if sep else target, None)
    except ValueError:
        raise AutoSKDError(f"--address {text}: expected ray://<host>:<port> (e.g. ray://head:10001), <host>:<port>, "
                           "auto or local") from None
    why = probe_grpc(host, port, timeout)
    if why is not None:
        raise AutoSKDError(f"--address {text}: no Ray cluster answers at {host}:{port} ({why}); check that its "
                           "head is up and the port open (Ray Client: `ray start --head` serves ray://<head>:10001), "
                           "or leave --address out for a local Ray")
    return str(address).strip()


@contextlib.contextmanager
def ray_session(env: dict[str, str], address: str | None = None, num_cpus: int | None = None):
    """Ray for trials, with ``env`` in every worker: a local Ray on 127.0.0.1 (``num_cpus``, default
    all cores) or the cluster at ``address`` (``auto`` inside a ``ray job submit`` entrypoint,
    ``ray://head:10001`` from outside). Ray is shut down at the end if this started it; an
    initialised Ray is used as it is."""
    ensure_ray_env()
    import ray

    started = False
    if not ray.is_initialized():
        check_ray_address(address)  # an unreachable cluster: one line in seconds, not Ray's timeout
        env = dict(env)
        runtime_env: dict = {"env_vars": env}
        common = dict(ignore_reinit_error=True, log_to_driver=False, runtime_env=runtime_env)
        if address is None or address == "local":
            ray.init(address=None, num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level="warning",
                     _node_ip_address="127.0.0.1", object_store_memory=256 * 1024 ** 2, **common)
        else:
            if address.startswith("ray://"):
                # a remote cluster has no copy of this checkout: ship the package with the job
                # (the team YAML, cache_dir and root must be on storage the cluster shares)
                runtime_env["py_modules"] = [str(REPO_ROOT / "autoskd")]
                env.pop("PYTHONPATH", None)
            ray.init(address=address, logging_level="warning", **common)
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def progress_callback(total: int, desc: str, unit: str, postfix: Callable[[object, str], str | None] | None = None):
    """A Ray Tune callback drawing one tqdm bar over ``total`` finished or failed trials (Tune's
    own output is off); ``postfix(trial, status)`` (status ``done`` or ``failed``) labels the bar
    after each."""
    from ray import tune
    from tqdm.auto import tqdm

    class _Bar(tune.Callback):
        def __init__(self):
            self._bar = None

        def __getstate__(self):  # Tune may pickle callbacks with the experiment state
            return {"_bar": None}

        def setup(self, **info):
            self._bar = tqdm(total=total, desc=desc, unit=unit)

        def _tick(self, trial, status):
            if self._bar is not None:
                self._bar.update(1)
                label = postfix(trial, status) if postfix is not None else None
                if label is not None:
                    self._bar.set_postfix_str(label)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._tick(trial, "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._tick(trial, "failed")

        def on_experiment_end(self, trials, **info):
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    return _Bar()


@contextlib.contextmanager
def quiet_tune_logs():
    """Ray Tune/Train's INFO chatter off for the block (a failed trial's traceback is still logged
    as an ERROR, and kept in its folder)."""
    quiet = [logging.getLogger(n) for n in ("ray.tune", "ray.train", "ray.air")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(max(q.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
