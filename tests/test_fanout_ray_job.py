"""``autoskd search`` and ``autoskd tune`` as ``ray job submit`` entrypoints, unchanged but for
``--address auto``: a head node on 127.0.0.1 started (and stopped) by this test, one job running
a small search and a small tune, its status and its results checked."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")

pytestmark = pytest.mark.integration


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def head():
    """`ray start --head --block` on 127.0.0.1 with its own ports and temp dir; stopped at the end
    by signalling the process this fixture started (never `ray stop`, which would end every Ray
    on the machine)."""
    pytest.importorskip("ray.dashboard.optional_deps", reason="`ray job submit` needs ray[default] (the job server)")
    if not RAY.exists():
        pytest.skip(f"no ray command beside {sys.executable}")
    gcs, dash, client, agent, agent_grpc, runtime_env_port, metrics = _free_ports(7)
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Ray >= 2.5x turns token authentication on by default; its job API then answers 401 until a
    # token is sent. This head listens on 127.0.0.1 only, so the test runs it without tokens.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env_port),
           "--metrics-export-port", str(metrics), "--num-cpus", "2", "--temp-dir", temp, "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"ray start exited: {proc.stdout.read()[-2000:]}")
                if time.time() > deadline:  # seen on this 2-core box under load: the dashboard agent never starts
                    pytest.skip("the Ray head's job server did not come up in 120 s on this machine; "
                                "the job test needs a working `ray start --head` with ray[default]")
                time.sleep(1)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of this node still in its process group
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory, real_tokenizer):
    """What a user submits: the package, a team, data and a search space (nothing else)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("job")
    work = root / "work"
    shutil.copytree(ROOT / "autoskd", work / "autoskd", ignore=shutil.ignore_patterns("__pycache__"))
    words = "movie plot cast story script scene music actor".split()
    gen = torch.Generator().manual_seed(0)
    rows = [{"text": f"{'good' if i % 2 else 'bad'} " + " ".join(words[int(j)] for j in torch.randint(8, (3,), generator=gen)),
             "label": i % 2} for i in range(240)]
    (work / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for layers in (1, 2):
        cfg = BertConfig(vocab_size=len(real_tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, num_labels=2)
        torch.manual_seed(layers)
        BertForSequenceClassification(cfg).save_pretrained(work / "models" / f"t{layers}")
        real_tokenizer.save_pretrained(work / "models" / f"t{layers}")
    team = {"name": "tiny", "student": {"source": "models/t2", "layers": 1, "init": "random"},
            "teachers": [{"name": f"T{k}", "source": f"models/t{k}", "finetune": {"epochs": 1, "lr": 3e-3, "batch_size": 16}}
                         for k in (1, 2)], "max_length": 16}
    (work / "team.yaml").write_text(yaml.safe_dump(team))
    (work / "space.yaml").write_text(yaml.safe_dump({"name": "job-kd", "fixed": {"method": "kd", "epochs": 1},
                                                     "params": {"lr": {"grid": [1e-3, 3e-3]}}}))
    return root


def test_search_and_tune_as_a_ray_job(head, job_dir):
    from ray.job_submission import JobStatus, JobSubmissionClient

    results = job_dir / "results"  # shared storage: on one node, any local folder
    py = sys.executable
    common = "--team team.yaml --task data.jsonl --cache-dir {r}/cache --no-progress --address auto".format(r=results)
    entrypoint = (f"{py} -m autoskd.cli search {common} --out {results}/search --m 0 --search-epochs 1 "
                  f"--eval-epochs 1 --candidates 2 --baselines uniform --max-concurrent 2"
                  f" && {py} -m autoskd.cli tune --space space.yaml {common} --sampler grid --out {results}/tune "
                  f"--batch-size 16")
    client = JobSubmissionClient(head)
    job = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(job_dir / "work")})
    deadline = time.time() + 900
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish in 15 minutes"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    summary = json.loads((results / "search" / "summary.json").read_text())
    assert summary["best"]["name"].startswith("candidate-")
    records = json.loads((results / "search" / "results.json").read_text())
    assert [r["status"] for r in records] == ["finished"] * 3, records
    assert (results / "search" / "best_student" / "config.json").exists()
    tune = json.loads((results / "tune" / "summary.json").read_text())
    assert tune["finished"] == 2 and (results / "tune" / "best_student" / "config.json").exists()
    assert "best:" in logs  # the job's own output: the tables a user reads with `ray job logs`


def test_lm_search_as_a_ray_job(head, tmp_path):
    """The LM search (``--task lm:<corpus>`` on a decoder team) as a job: its arms are Ray trials."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    sys.path.insert(0, str(ROOT / "tests"))
    from lm_helpers import bpe_tokenizer, documents, tiny_llama

    work, results = tmp_path / "work", tmp_path / "results"
    shutil.copytree(ROOT / "autoskd", work / "autoskd", ignore=shutil.ignore_patterns("__pycache__"))
    tok = bpe_tokenizer()
    for name, layers in (("big", 2), ("small", 1)):
        tiny_llama(len(tok), layers=layers, seed=layers).save_pretrained(work / "models" / name)
        tok.save_pretrained(work / "models" / name)
    (work / "docs.txt").write_text("\n".join(documents(160, seed=4)))
    (work / "team.yaml").write_text(yaml.safe_dump({
        "kind": "lm", "max_length": 16, "student": {"source": "models/big", "layers": 1},
        "teachers": [{"name": "big", "source": "models/big"}, {"name": "small", "source": "models/small"}]}))
    py = sys.executable
    entrypoint = (f"{py} -m autoskd.cli search --team team.yaml --task lm:docs.txt --cache-dir {results}/cache "
                  f"--no-progress --address auto --out {results}/lm --candidates 1 --random 0 --baselines single "
                  f"--set search.max_steps=4 --set search.top_k=8 --set search.lr=0.003")
    client = JobSubmissionClient(head)
    job = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(work)})
    deadline = time.time() + 600
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish in 10 minutes"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    result = json.loads((results / "lm" / "result.json").read_text())
    assert {a["name"] for a in result["arms"]} == {"candidate-00", "single-big", "single-small"}
    assert (results / "lm" / "ray" / "trials").exists()  # the arms ran as Ray Tune trials
    assert (results / "lm" / "student" / "config.json").exists() and "best:" in logs
