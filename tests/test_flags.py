"""Every flag, every subcommand (issue 24): each numeric flag, path, URL (Optuna storage, Ray
address) and YAML file gets one line ``autoskd: error: ...`` naming the problem and the fix, exit
code 2, fast and before any expensive work (no team is built, no data read, no Ray started).

The cases include the ones a user tried: ``tune --batch-size 0``, ``tune --grace-period 0``,
``tune --out <an existing file>``, ``analyse --every 0``, ``search --address ray://127.0.0.1:1``
(a ConnectionError after 44 s, now refused within seconds), ``--xi inf``, and ``--theta-lrs 2.5e-4
3e-4`` (every rate reaches the search).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from autoskd.cli import main

#: seconds a refused command may take (argument parsing and resolving the experiment; the busy test
#: box included); an unreachable Ray address used to take 44 s
FAST = 15.0
SPACE = "search_spaces/kd-hparams.yaml"


def _refused_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("flags")
    (root / "a_file").write_text("not a folder\n")
    (root / "bad.yaml").write_text("a: [1,\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "grace0.yaml").write_text(f"kind: tune\ntune: {{space: {SPACE}, grace_period: 0}}\n")
    (root / "storage.yaml").write_text(f"kind: tune\ntune: {{space: {SPACE}, storage: 'foo://x'}}\n")
    return {"file": str(root / "a_file"), "bad": str(root / "bad.yaml"), "list": str(root / "list.yaml"),
            "folder": str(root), "grace0": str(root / "grace0.yaml"), "storage": str(root / "storage.yaml")}


@pytest.fixture(autouse=True)
def no_ray_cluster_here(monkeypatch, tmp_path):
    """``--address auto`` finds no cluster: no RAY_ADDRESS, an empty Ray temp folder."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))


PORT = _refused_port()
T = ["tune", "--space", SPACE]
P = ["plan", "--teacher", "110M", "--student", "110M"]
D = ["dashboard", "--storage"]

CASES = [
    # tune: numbers, paths, URLs
    (T + ["--batch-size", "0"], "--batch-size"),
    (T + ["--grace-period", "0"], "--grace-period"),
    (T + ["--trials", "0"], "--trials"),
    (T + ["--reduction-factor", "1"], "reduction_factor"),
    (T + ["--reduction-factor", "inf"], "--reduction-factor"),
    (T + ["--max-concurrent", "0"], "--max-concurrent"),
    (T + ["--cpus-per-trial", "0"], "--cpus-per-trial"),
    (T + ["--gpus-per-trial", "-1"], "--gpus-per-trial"),
    (T + ["--seed", "-1"], "--seed"),
    (T + ["--out", "{file}"], "existing file"),
    (T + ["--address", f"ray://127.0.0.1:{PORT}"], "no Ray cluster answers"),
    (T + ["--address", "http://127.0.0.1:8265"], "not a Ray address"),
    (T + ["--address", "ray://head"], "ray://<host>:<port>"),
    (T + ["--storage", "foo://x"], "unknown database"),
    (T + ["--storage", "sqlite://"], "in-memory"),
    (T + ["--storage", "sqlite:///{file}/optuna.db"], "existing file"),
    (T + ["--storage", "{folder}"], "is a folder"),
    (T + ["--storage", f"postgresql://u@127.0.0.1:{PORT}/db"], "cannot reach the postgresql server"),
    (T + ["--storage", "mysql+nodriver://u@h/db"], "mysql"),
    (["tune", "--space", "{bad}"], "not valid YAML"),
    (["tune", "--space", "{list}"], "mapping"),
    (["tune", "--space", "{folder}/missing.yaml"], "not found"),
    (["run", "{grace0}"], "tune.grace_period"),
    (["run", "{storage}"], "tune.storage"),
    # search
    (["search", "--address", f"ray://127.0.0.1:{PORT}"], "no Ray cluster answers"),
    (["search", "--address", "auto"], "no running Ray cluster"),
    (["search", "--xi", "inf"], "xi"),
    (["search", "--xi", "-1"], "xi"),
    (["search", "--xi", "sometimes"], "xi"),
    (["search", "--theta-lrs", "3e-4", "0"], "--theta-lrs"),
    (["search", "--theta-lrs", "3e-4", "3e-4"], "distinct"),
    (["search", "--processes-per-trial", "0"], "--processes-per-trial"),
    (["search", "--set", "search.address=ray://127.0.0.1:" + str(PORT)], "search.address"),
    # distill and its files
    (["distill", "--teachers", "nope"], "not in team"),
    (["distill", "--teacher", "nope"], "not in team"),
    (["distill", "--tensor-parallel", "0"], "--tensor-parallel"),
    (["distill", "--method", "{bad}"], "not valid YAML"),
    (["distill", "--deepspeed", "{bad}"], "DeepSpeed config"),
    (["distill", "--deepspeed", "{folder}/missing.json"], "does not exist"),
    (["distill", "--team", "{bad}"], "not valid YAML"),
    (["run", "{bad}"], "not valid YAML"),
    # chain, analyse
    (["chain", "--assistants", "0"], "chain.assistants"),
    (["chain", "--assistants", "x"], "--assistants"),
    (["chain", "--epochs", "0"], "--epochs"),
    (["chain", "--max-length", "1"], "--max-length"),
    (["chain", "--out", "{file}"], "existing file"),
    (["analyse", "--every", "0"], "--every"),
    (["analyse", "--dev-batches", "0"], "--dev-batches"),
    (["analyse", "--batch-size", "0"], "--batch-size"),
    (["analyse", "--out", "{file}"], "existing file"),
    (["analyse", "--teacher", "nope"], "not in team"),
    # plan
    (P + ["--gpus", "0"], "--gpus"),
    (P + ["--gpus", "two"], "--gpus"),
    (P + ["--teacher-layers", "0"], "--teacher-layers"),
    (P + ["--student-layers", "-1"], "--student-layers"),
    (P + ["--fragmentation", "1"], "--fragmentation"),
    (P + ["--fragmentation", "nan"], "--fragmentation"),
    (P + ["--top", "0"], "--top"),
    (P + ["--out", "{file}"], "existing file"),
    (P + ["--plot", "{folder}"], "is a folder"),
    (P + ["--emit-deepspeed", "{file}/ds.json"], "existing file"),
    (P + ["--gpu-memory", "lots"], "memory size"),
    # dashboard
    (D + ["sqlite:///{folder}/none.db", "--port", "0"], "--port"),
    (D + ["sqlite:///{folder}/none.db", "--port", "70000"], "--port"),
    (D + ["sqlite:///{folder}/none.db", "--port", "http"], "--port"),
    (D + ["foo://bar"], "unknown database"),
    (D + [f"postgresql://u@127.0.0.1:{PORT}/db"], "cannot reach"),
    (D + ["sqlite:///{folder}/none.db"], "does not exist yet"),
    # team build
    (["team", "build", "{bad}"], "not valid YAML"),
    (["team", "build", "teams/minilm-ladder.yaml", "--max-train", "0"], "--max-train"),
]


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_value_is_one_line_exit_2_and_fast(capsys, files, argv, words):
    argv = [a.format(**files) for a in argv]
    words = words.format(**files)
    capsys.readouterr()
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    seconds = time.perf_counter() - start
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, lines)
    assert len(lines) == 1 and lines[0].startswith("autoskd: error: "), lines
    assert words in lines[0], lines[0]
    assert seconds < FAST, f"{seconds:.1f} s: {lines[0]}"


def test_unreachable_address_fails_within_seconds_even_when_nothing_answers(monkeypatch):
    """A host that accepts the connection and never answers (a firewall, a wrong service): the probe
    gives up after its timeout, instead of Ray's own 40-odd seconds."""
    from autoskd.errors import AutoSKDError
    from autoskd.ray_runtime import check_ray_address

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        start = time.perf_counter()
        with pytest.raises(AutoSKDError, match="no answer within 0.5 s"):
            check_ray_address(f"ray://127.0.0.1:{port}", timeout=0.5)
        assert time.perf_counter() - start < 5


def test_a_live_grpc_server_passes_the_address_check():
    """What Ray Client and the GCS are: gRPC servers. One on a loopback port passes the probe."""
    from concurrent import futures

    import grpc

    from autoskd.ray_runtime import check_ray_address

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert check_ray_address(f"ray://127.0.0.1:{port}") == f"ray://127.0.0.1:{port}"
        assert check_ray_address(f"127.0.0.1:{port}") == f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_ray_session_checks_the_address_before_starting_ray(monkeypatch):
    """The Python API (run_arms, run_tune) fails as fast as the command line."""
    import ray

    from autoskd.errors import AutoSKDError
    from autoskd.ray_runtime import ray_session

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init must not be reached"))
    start = time.perf_counter()
    with pytest.raises(AutoSKDError, match="no Ray cluster answers"):
        with ray_session({}, address=f"ray://127.0.0.1:{PORT}"):
            pass
    assert time.perf_counter() - start < 5


def test_every_theta_rate_reaches_the_search(capsys, tmp_path, monkeypatch):
    """``--theta-lrs 2.5e-4 3e-4`` (and the same grid with --set) hands both rates to the search."""
    from autoskd.search import run as search_run

    seen = []
    monkeypatch.setattr(search_run, "run_search", lambda team, task, config, out, **kw: seen.append(config))
    assert main(["search", "--theta-lrs", "2.5e-4", "3e-4", "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert main(["search", "--set", "search.theta_lrs=[2.5e-4, 3e-4]", "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    assert [c.theta_lrs for c in seen] == [[2.5e-4, 3e-4]] * 2
    assert [c.grid for c in seen] == [[2.5e-4, 3e-4]] * 2


def test_address_and_storage_that_work_are_kept(capsys, tmp_path):
    """A reachable storage and the local Ray pass, and the resolved experiment keeps them as given."""
    db = tmp_path / "studies" / "optuna.db"
    assert main(["tune", "--space", SPACE, "--storage", f"sqlite:///{db}", "--address", "local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"storage: sqlite:///{db}" in out and "address: local" in out
    assert not Path(db).exists()  # a dry run creates nothing
