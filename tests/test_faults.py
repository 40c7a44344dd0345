"""Faults that must never lose work or end in a traceback (issue 24, "Faults").

* two ``autoskd tune`` drivers on one Optuna study (SQLite, and a real PostgreSQL server from
  Debian's ``postgresql`` package that the fixture starts on a loopback port): neither fails the
  other's running trials; a driver killed with ``kill -9`` has its trial failed after the grace
  period and queued again with the same parameters (Optuna's heartbeats and retry);
* a search whose best arm ASHA stopped early (no test accuracy) prints its summary;
* a θ step whose gradient is not finite is counted, and a diverging one stops the search in one line;
* under ``--strategy cr`` the student's real step is the virtual step the θ step differentiates;
* measured: ``kill -9`` of ``autoskd tune`` mid-study, then a rerun: no finished trial redone, none
  lost, and a trial whose loss goes NaN is recorded as failed with its reason.

The drivers here are the project's own (:class:`autoskd.fanout.study.TuneSearch`, what Ray Tune
calls) with tiny objective functions in place of trainings.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from autoskd.errors import AutoSKDError
from autoskd.fanout.space import SearchSpace
from autoskd.fanout.study import fail_stale_trials, make_sampler, open_storage, open_study

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
#: short heartbeats for the tests (the defaults are 10 s and 60 s)
BEAT, GRACE = 1, 3
SPACE = SearchSpace.from_dict({"name": "faults", "params": {"lr": {"uniform": [0.0, 1.0]}}})


# ---------------------------------------------------------------------------------------------- storages
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="module")
def postgres_url():
    """A throw-away PostgreSQL server (Debian's ``postgresql`` package) on 127.0.0.1, data in a temp
    folder, run as a non-root user when the tests run as root (initdb refuses root)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries not found (Debian package `postgresql`; `make test` installs it)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg is missing (pip install 'psycopg[binary]', "
                                          "in the test extra)")
    folder = Path(tempfile.mkdtemp(prefix="autoskd-pg-"))
    data, port = folder / "data", _free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None:
            pytest.skip("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")
        pw = pwd.getpwnam(user)
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", user, "--"]
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    subprocess.run(prefix + [initdb, "-D", str(data), "-A", "trust", "-U", "autoskd", "-E", "UTF8"], check=True,
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=180)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=40"
    subprocess.run(prefix + [pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "-t", "120",
                             "start"], check=True, env=env, stdout=subprocess.DEVNULL, timeout=180)
    try:
        yield f"postgresql://autoskd@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("postgres_url")


# ---------------------------------------------------------------------------------------------- drivers
class Driver:
    """One ``autoskd tune`` driver on the shared study, as :func:`autoskd.fanout.tune.run_tune` opens
    it (storage with heartbeats, study, stale trials failed at the start) and Ray Tune drives it
    (``TuneSearch.suggest`` / ``on_trial_complete``)."""

    def __init__(self, url: str, study_name: str, seed: int):
        from autoskd.fanout.study import TuneSearch

        self.storage = open_storage(url, heartbeat_interval=BEAT, grace_period=GRACE)
        self.study = open_study(self.storage, study_name, ["maximize"], SPACE, ["dev_acc"])
        self.failed_at_start = fail_stale_trials(self.study)
        self.search = TuneSearch(space=SPACE.to_optuna(), metric="dev_acc", mode="max",
                                 sampler=make_sampler("random", SPACE, seed=seed), study_name=study_name,
                                 storage=self.storage)

    def run(self, trial_id: str, seconds: float) -> dict:
        config = self.search.suggest(trial_id)
        time.sleep(seconds)  # the trial's "training"
        value = 1.0 - (config["lr"] - 0.3) ** 2
        self.search.on_trial_complete(trial_id, result={"dev_acc": value, "epochs": 1})
        return {"number": config["optuna_trial"], "lr": config["lr"], "value": value}


def _trials(url: str, name: str):
    return optuna.load_study(study_name=name, storage=url).get_trials()


def test_two_drivers_on_one_study_never_fail_each_others_trials(storage_url):
    """Driver A's trial runs longer than the grace period while driver B starts and runs three
    trials; B's start used to mark every running trial of the study failed, A's included."""
    name = f"two-{time.time_ns()}"
    a = Driver(storage_url, name, seed=1)
    results: dict[str, object] = {}
    started = threading.Event()

    def driver_a():
        try:
            config = a.search.suggest("a0")
            started.set()
            time.sleep(GRACE + 3)  # longer than the grace period: only the heartbeats keep it alive
            value = 1.0 - (config["lr"] - 0.3) ** 2
            a.search.on_trial_complete("a0", result={"dev_acc": value, "epochs": 1})
            results["a"] = {"number": config["optuna_trial"], "value": value}
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            results["a"] = err
        finally:
            started.set()

    thread = threading.Thread(target=driver_a)
    thread.start()
    assert started.wait(120)
    b = Driver(storage_url, name, seed=2)  # a second driver starts while A's trial runs
    assert b.failed_at_start == 0
    results["b"] = [b.run(f"b{k}", 1.0) for k in range(3)]
    thread.join(120)
    assert isinstance(results["a"], dict), results["a"]
    trials = _trials(storage_url, name)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4, [(t.number, t.state) for t in trials]
    by_number = {t.number: t for t in trials}
    assert by_number[results["a"]["number"]].value == pytest.approx(results["a"]["value"])
    for r in results["b"]:
        assert by_number[r["number"]].value == pytest.approx(r["value"])


KILLED_DRIVER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_faults import Driver
    d = Driver({url!r}, {name!r}, seed=7)
    config = d.search.suggest("killed")
    print(config["optuna_trial"], config["lr"], flush=True)
    time.sleep(600)  # a long trial: killed -9 by the test
""")


def test_a_killed_drivers_trial_is_failed_after_the_grace_period_and_run_again(storage_url):
    name = f"killed-{time.time_ns()}"
    code = KILLED_DRIVER.format(root=str(ROOT), tests=str(TESTS), url=storage_url, name=name)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip(), proc.stderr.read()
        number, x = int(line.split()[0]), float(line.split()[1])
        survivor = Driver(storage_url, name, seed=8)  # starts while the other driver is alive: touches nothing
        assert survivor.failed_at_start == 0
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    time.sleep(GRACE + 2 * BEAT)
    rerun = survivor.run("after", 0.0)  # the next ask fails the dead driver's trial and runs it again
    trials = {t.number: t for t in _trials(storage_url, name)}
    assert trials[number].state == TrialState.FAIL
    retry = trials[rerun["number"]]
    assert retry.state == TrialState.COMPLETE and retry.params["lr"] == pytest.approx(x)
    assert retry.system_attrs["failed_trial"] == number
    from autoskd.fanout.results import trial_rows

    rows = {r["number"]: r for r in trial_rows(optuna.load_study(study_name=name, storage=storage_url), ["dev_acc"])}
    assert "driver stopped" in rows[number]["error"]


def test_in_memory_study_still_fails_a_dead_runs_trials():
    """One process owns an in-memory study: at a driver's start its running trials are a dead run's."""
    study = optuna.create_study()
    study.ask(SPACE.to_optuna())
    assert fail_stale_trials(study) == 1


# ---------------------------------------------------------------------------------------------- search report
class _Team:
    teachers = {"t0": None, "t1": None}
    dev_accuracy = {"t0": 0.7, "t1": 0.8}


def test_search_summary_with_a_best_arm_asha_stopped(tmp_path, capsys):
    """The best candidate was stopped early (a baseline beat it at the rung): no test accuracy.
    The summary used to format None with :.4f (TypeError after the whole search had run)."""
    from autoskd.search.run import summarise

    stopped = {"name": "candidate-00", "group": "autoskd", "kind": "distribution", "theta": [0.4, 0.6],
               "dev_acc": 0.81, "test_acc": None, "stopped_early": True, "epochs_run": 1, "epochs_planned": 3,
               "status": "stopped", "seconds": None, "student_trainings": 1}
    single = {"name": "single-t1", "group": "single", "kind": "single", "teacher": "t1", "theta": None,
              "dev_acc": 0.79, "test_acc": 0.78, "status": "finished", "seconds": 3.0, "student_trainings": 1}
    search = {"theta_lr": 5e-4, "dropped": [], "final_theta": [0.4, 0.6]}
    summary = summarise([stopped, single], [search], _Team(), 0, "m = 0", tmp_path)
    out = capsys.readouterr().out
    assert summary["best"]["name"] == "candidate-00" and summary["best"]["test_acc"] is None
    assert "test n/a (stopped early by ASHA after 1 of 3 epochs)" in out
    assert "no student saved" in out and "dev 0.8100" in out


def test_tune_trial_of_a_search_whose_best_arm_was_stopped(tmp_path, monkeypatch):
    """``autoskd tune`` over AutoSKD searches: a search whose best arm ASHA stopped has no test
    accuracy; the trial records none instead of failing on float(None)."""
    from autoskd.fanout.trial import run_autoskd_trial
    from autoskd.search import run as search_run
    from autoskd.search.trials import TrialSpec

    monkeypatch.setattr(search_run, "run_search", lambda *a, **k: {"best": {"name": "candidate-00", "dev_acc": 0.8,
                                                                             "test_acc": None, "theta": [0.5, 0.5]}})
    spec = TrialSpec(team_path=str(ROOT / "teams" / "minilm-ladder.yaml"), task={"name_or_path": "rotten_tomatoes"},
                     root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    record = run_autoskd_trial(spec, {"theta.lr": 1e-3}, tmp_path / "trial")
    assert record["dev_acc"] == 0.8 and record["test_acc"] is None


def test_failed_tune_trial_reason_reaches_the_results(tmp_path):
    """A trial that raised (here: out of memory) is failed in the study; its reason, the first line
    of its error.txt, is in the table, results.json and summary.json."""
    from autoskd.fanout.results import write_results
    from autoskd.fanout.trial import write_error

    study = optuna.create_study(direction="maximize", study_name="oom")
    ok = study.ask(SPACE.to_optuna())
    study.tell(ok, 0.8)
    bad = study.ask(SPACE.to_optuna())
    folder = tmp_path / "trials" / f"trial-{bad.number:04d}"
    folder.mkdir(parents=True)
    try:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    except torch.OutOfMemoryError as err:
        write_error(folder, err)
    study.tell(bad, state=TrialState.FAIL)
    summary = write_results(study, tmp_path, ["dev_acc"])
    reason = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert summary["failed"] == {str(bad.number): reason} and summary["finished"] == 1
    assert f"FAILED: {reason}" in (tmp_path / "results.txt").read_text()
    rows = json.loads((tmp_path / "results.json").read_text())
    assert rows[bad.number]["error"] == reason and "Traceback" in (folder / "error.txt").read_text()


# ---------------------------------------------------------------------------------------------- theta
def test_nonfinite_theta_gradients_are_counted_and_a_diverging_search_stops():
    from autoskd.search.distribution import TeacherDistribution, ThetaOptimizer

    dist = TeacherDistribution.uniform(3)
    opt = ThetaOptimizer(dist, strategy="cr", lr=0.1, nonfinite_floor=3, nonfinite_share=0.25)
    for _ in range(8):
        opt.step(torch.tensor([0.1, -0.2, 0.05]))
    before = dist.probs()
    opt.step(torch.tensor([float("nan"), 0.1, 0.0]))  # skipped, not zeroed: θ does not move
    assert torch.equal(dist.probs(), before) and opt.nonfinite_steps == 1 and opt.steps_taken == 9
    opt.step(torch.tensor([0.0, float("inf"), 0.0]))
    opt.step(torch.tensor([0.0, 0.0, float("-inf")]))
    assert opt.nonfinite_steps == 3  # at the floor: still running
    with pytest.raises(AutoSKDError) as info:
        opt.step(torch.tensor([float("nan")] * 3))
    message = str(info.value)
    assert "diverged" in message and "4 of 12" in message and "\n" not in message
    state = opt.state_dict()
    again = ThetaOptimizer(TeacherDistribution.uniform(3), strategy="cr")
    again.load_state_dict(state)
    assert (again.nonfinite_steps, again.steps_taken) == (4, 12)


def test_sswo_counts_only_the_entry_it_moves():
    from autoskd.search.distribution import TeacherDistribution, ThetaOptimizer

    opt = ThetaOptimizer(TeacherDistribution.uniform(3), strategy="sswo", lr=0.1)
    opt.step(torch.tensor([float("nan"), 0.1, 0.0]), sampled=1)  # the NaN entry does not move
    assert opt.nonfinite_steps == 0
    opt.step(torch.tensor([float("nan"), 0.1, 0.0]), sampled=0)
    assert opt.nonfinite_steps == 1


@pytest.fixture(scope="module")
def theta_setup(tok, tmp_path_factory):
    from autoskd.data.collate import make_loader, tokenize_split
    from autoskd.data.tasks import load_task
    from autoskd.engine.teachers import Teacher
    from helpers import tiny_bert

    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"{'good' if i % 2 else 'bad'} film number {i}", "label": i % 2})
                              for i in range(80)))
    task = load_task(str(path), seed=0)
    train = make_loader(tokenize_split(task.split("train"), tok, 12), tok, 8, shuffle=False)
    val = make_loader(tokenize_split(task.split("val"), tok, 12), tok, 8, shuffle=False)
    teachers = {f"t{k}": Teacher(f"t{k}", tiny_bert(tok, layers=1, seed=10 + k, dropout=0.0)) for k in range(3)}
    return {"train": train, "val": val, "teachers": teachers, "tok": tok}


def _theta_step(setup, strategy: str):
    from autoskd.engine.teachers import SampledTeacher
    from autoskd.search.distribution import TeacherDistribution
    from autoskd.search.theta_step import ThetaConfig, ThetaStep

    config = ThetaConfig(strategy=strategy, lr=0.1)
    dist = TeacherDistribution.from_list([0.2, 0.5, 0.3])
    policy = SampledTeacher(setup["teachers"], dist.theta, seed=0, scaling=config.scaling)
    return ThetaStep(dist, policy, setup["val"], config, m=0, alpha=0.5, temperature=2.0), config


def test_cr_real_student_step_is_the_virtual_step(theta_setup):
    """Under CR the θ step's virtual step learns from the θ-mixture; the student's real step used
    to learn from one sampled teacher (θ_i-scaled). Now both learn from the mixture: one SGD step
    of the engine equals w − ξ ∇_w L_train of the θ step's closure."""
    from autoskd.engine.trainer import Distiller
    from autoskd.search.bilevel import named_trainable_params
    from helpers import tiny_bert

    step, config = _theta_step(theta_setup, "cr")
    student = tiny_bert(theta_setup["tok"], layers=1, seed=3, dropout=0.0).eval()
    batch = next(iter(theta_setup["train"]))
    train_loss, _ = step.loss_closures(student, batch, next(iter(theta_setup["val"])), None)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in named_trainable_params(student).items()}
    grads = torch.autograd.grad(train_loss(params, step.dist.theta.detach()), list(params.values()))
    expected = {k: params[k].detach() - config.lr * g for k, g in zip(params, grads)}

    engine = Distiller(student, "kd", step.policy, progress=False, method_options={"alpha": 0.5, "temperature": 2.0},
                       device="cpu")
    engine.ctx.stage = "task"
    engine.train_step(batch, torch.optim.SGD(student.parameters(), lr=config.lr), max_grad_norm=0.0)
    for name, p in student.named_parameters():
        assert torch.allclose(p.detach(), expected[name], atol=1e-6), name
    assert sum(step.policy.counts.values()) == 0  # no teacher drawn under CR


def test_sswo_student_still_samples_one_teacher(theta_setup):
    step, _ = _theta_step(theta_setup, "sswo")
    assert not step.policy.mixture and step.policy.choose(0) in theta_setup["teachers"]


# ---------------------------------------------------------------------------------------------- measured: kill -9
WORDS = "movie plot cast story script scene music actor ending film".split()
#: the learning rates of the killed tune's grid; 1e38 sends the student's logits to inf: the loss
#: goes NaN at the second step and the trial raises (the engine refuses a non-finite loss)
GRID = [3e-3, 1e38, 2e-3, 1e-3]


@pytest.fixture(scope="module")
def tune_files(tmp_path_factory, real_tokenizer):
    """A task a tiny model learns in an epoch, a team of two tiny BERTs, a grid of four learning rates."""
    import yaml
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("killed-tune")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(240):
        words = [WORDS[int(j)] for j in torch.randint(len(WORDS), (3,), generator=gen)]
        rows.append({"text": f"{'good' if i % 2 else 'bad'} {' '.join(words)}", "label": i % 2})
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for layers in (1, 2):
        cfg = BertConfig(vocab_size=len(real_tokenizer), hidden_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, num_labels=2)
        torch.manual_seed(layers)
        BertForSequenceClassification(cfg).save_pretrained(root / f"t{layers}")
        real_tokenizer.save_pretrained(root / f"t{layers}")
    team = {"name": "tiny", "student": {"source": str(root / "t2"), "layers": 1, "init": "random"},
            "teachers": [{"name": f"T{k}", "source": str(root / f"t{k}"),
                          "finetune": {"epochs": 1, "lr": 3e-3, "batch_size": 16}} for k in (1, 2)],
            "max_length": 16}
    (root / "team.yaml").write_text(yaml.safe_dump(team))
    (root / "space.yaml").write_text(yaml.safe_dump({"name": "lrs", "fixed": {"method": "kd", "epochs": 1},
                                                     "params": {"lr": {"grid": GRID}}}))
    return root


def _tune_command(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "autoskd.cli", "tune", "--space", str(root / "space.yaml"), "--team",
            str(root / "team.yaml"), "--task", str(root / "data.jsonl"), "--sampler", "grid", "--max-concurrent", "1",
            "--cpus-per-trial", "1", "--batch-size", "16", "--out", str(out), "--cache-dir", str(root / "cache"),
            "--no-progress"]


def _tune_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _kill_group(proc: subprocess.Popen) -> None:
    """The killed driver's own process group (its Ray processes, if any outlived it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _mid_trial(out: Path) -> bool:
    folders = list(out.glob("trials/trial-*"))
    finished = [f for f in folders if (f / "trial.json").exists()]
    training = [f for f in folders if not (f / "trial.json").exists() and not (f / "error.txt").exists()]
    return bool(finished) and bool(training)


def test_a_trial_finished_on_disk_but_never_told_is_told_from_its_record(tmp_path):
    """A driver killed between a trial's record and its report: the next start tells the study
    from ``trials/<trial>/trial.json`` instead of running the point again."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = open_study(open_storage(url, heartbeat_interval=BEAT, grace_period=GRACE), "told", ["maximize"], SPACE)
    trial = study.ask(SPACE.to_optuna())
    folder = tmp_path / "trials" / f"trial-{trial.number:04d}"
    folder.mkdir(parents=True)
    (folder / "trial.json").write_text(json.dumps({"trial": folder.name, "dev_acc": 0.75, "test_acc": 0.7,
                                                   "epochs": 2, "values": {"lr": trial.params["lr"]}}))
    assert fail_stale_trials(study, tmp_path, ["dev_acc"]) == 0
    told = optuna.load_study(study_name="told", storage=url).trials[0]
    assert told.state == TrialState.COMPLETE and told.value == 0.75
    assert told.user_attrs["test_acc"] == 0.7 and told.user_attrs["recorded_from"] == "trial.json"


def test_kill_9_of_tune_mid_study_then_rerun_loses_and_redoes_nothing(tune_files, tmp_path):
    """Measured: ``autoskd tune`` is killed with SIGKILL once a trial has finished, then rerun with
    the same command. Finished trials are kept (their files untouched, their points not run again),
    every point of the grid ends with a finished trial, and the trial whose loss went NaN is recorded
    as failed with its reason without sinking the study."""
    out = tmp_path / "run"
    timings = {}
    start = time.perf_counter()
    proc = subprocess.Popen(_tune_command(tune_files, out), cwd=tmp_path, env=_tune_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 420
        while not _mid_trial(out):  # a trial finished and the next one training
            if proc.poll() is not None:
                pytest.fail(f"tune exited before the kill:\n{proc.stdout.read()[-3000:]}")
            if time.time() > deadline:
                pytest.fail("no trial finished within 420 s")
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, mid-study and mid-trial
        timings["killed_after_s"] = round(time.perf_counter() - start, 1)
        proc.wait(30)
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    time.sleep(3)  # a trial worker may still write its record as Ray winds down: finished work too
    before = {p.parent.name: (p.stat().st_mtime_ns, json.loads(p.read_text())["values"]["lr"])
              for p in out.glob("trials/*/trial.json")}
    assert 1 <= len(before) < len(GRID)

    start = time.perf_counter()
    rerun = subprocess.run(_tune_command(tune_files, out), cwd=tmp_path, env=_tune_env(), capture_output=True,
                           text=True, timeout=600, start_new_session=True)
    timings["rerun_s"] = round(time.perf_counter() - start, 1)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    kept = int(rerun.stdout.split(" finished trial(s) kept")[0].rsplit(" ", 1)[-1])
    assert kept >= len(before), rerun.stdout[:500]  # every trial with a record, told or not before the kill

    after = {p.parent.name: (p.stat().st_mtime_ns, json.loads(p.read_text())["values"]["lr"])
             for p in out.glob("trials/*/trial.json")}
    assert all(after[name] == stamp for name, stamp in before.items())  # not redone
    study = optuna.load_study(study_name="lrs", storage=f"sqlite:///{out / 'optuna.db'}")
    complete = [t.params["lr"] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert sorted(complete) == sorted(lr for lr in GRID if lr < 1)  # every learning point once: none lost, none twice
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] == len(GRID) - 1
    failed = [t for t in study.get_trials(states=(TrialState.FAIL,)) if t.params["lr"] == 1e38]
    assert failed, [(t.number, t.state, t.params) for t in study.get_trials()]
    reasons = {summary["failed"][str(t.number)] for t in failed}
    assert all("AutoSKDError: loss became" in r and "lower the learning rate" in r for r in reasons), reasons
    assert "FAILED: AutoSKDError: loss became" in (out / "results.txt").read_text()
    print(f"kill -9 of autoskd tune: {timings}")
