"""autoskd.engine.trainer: the one training loop (stages, schedule, clipping, callbacks,
evaluation, metrics.jsonl / training.png, checkpoint + resume, restore-best, errors).

Everything runs on tiny random-init BERTs (hidden 32, 2 heads) with the real MiniLM tokenizer
and a trivially learnable synthetic task, so the whole file takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from torch import nn

from autoskd.data.collate import make_loader, tokenize_split
from autoskd.engine.callbacks import Callback
from autoskd.engine.metrics_log import read_jsonl
from autoskd.engine.trainer import Distiller, Stage, TrainResult, evaluate
from autoskd.errors import AutoSKDError
import autoskd.methods  # noqa: F401  (registers the built-in methods these runs name)

MAX_LENGTH = 32


# ---------------------------------------------------------------------------------------------- fixtures
from helpers import InterruptAt, tiny_bert  # noqa: E402


FILLERS = ["movie", "film", "plot", "story", "cast", "show", "script", "scene"]


def good_bad(n: int, offset: int = 0) -> datasets.Dataset:
    """'good ...' -> 1, 'bad ...' -> 0; the label is the first word."""
    texts, labels = [], []
    for i in range(n):
        j = i + offset
        label = j % 2
        word = "good" if label else "bad"
        texts.append(f"{word} {FILLERS[j % 8]} {FILLERS[(j // 8) % 8]} and the {FILLERS[(3 * j) % 8]}")
        labels.append(label)
    return datasets.Dataset.from_dict({"text": texts, "label": labels, "idx": list(range(n))})


def loader(tok, n: int = 64, batch_size: int = 16, shuffle: bool = True, seed: int = 0, offset: int = 0):
    return make_loader(tokenize_split(good_bad(n, offset), tok, MAX_LENGTH), tok, batch_size, shuffle=shuffle,
                       seed=seed)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), k


class Recorder(Callback):
    """Records the event sequence (and optionally the learning rate before each step)."""

    def __init__(self):
        self.events: list[str] = []
        self.lrs: list[float] = []
        self.stages: list[str] = []

    def on_stage_start(self, trainer, ctx):
        self.events.append("stage_start")
        self.stages.append(ctx.stage)

    def on_step_begin(self, trainer, ctx, batch):
        self.events.append("step_begin")
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])

    def on_step_end(self, trainer, ctx, batch, losses):
        self.events.append("step_end")

    def on_epoch_end(self, trainer, ctx, metrics):
        self.events.append("epoch_end")

    def on_stage_end(self, trainer, ctx):
        self.events.append("stage_end")


# ---------------------------------------------------------------------------------------------- learning
def test_finetune_learns_a_trivial_task(tok):
    student = tiny_bert(tok)
    dev = loader(tok, 64, 32, shuffle=False, offset=1000)
    before = evaluate(student, dev, "cpu")["accuracy"]
    result = Distiller(student, "finetune", None, seed=0, progress=False, device="cpu").fit(
        [Stage("task", loader(tok, 192, 16), epochs=4, lr=3e-3, warmup_ratio=0.1)], dev=dev)
    assert isinstance(result, TrainResult)
    assert before < 0.9
    assert result.best_dev_acc > 0.9 and result.final_dev_acc > 0.9, (before, result.history)
    assert evaluate(student, dev, "cpu")["accuracy"] > 0.9
    assert result.steps == 4 * 12 and result.seconds > 0
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]
    assert student.training  # fit leaves the student as it found it (train mode)


def test_evaluate_accuracy_and_loss_by_hand():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            # row 0 -> class 0 confidently, rows 1.. -> class 1 mildly
            out = torch.zeros(len(input_ids), 2)
            out[:, 1] = 1.0
            out[0] = torch.tensor([3.0, 0.0])
            return out

    batch = {"input_ids": torch.ones(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1]), "idx": torch.arange(4)}
    model = Fixed().train()
    scores = evaluate(model, [batch], "cpu")
    assert scores["accuracy"] == pytest.approx(3 / 4)
    ce0 = -math.log(math.exp(3) / (math.exp(3) + 1))
    ce_right, ce_wrong = -math.log(math.e / (math.e + 1)), -math.log(1 / (math.e + 1))
    assert scores["loss"] == pytest.approx((ce0 + ce_right + ce_wrong + ce_right) / 4, rel=1e-5)
    assert model.training  # mode restored
    with pytest.raises(AutoSKDError, match="evaluation data is empty"):
        evaluate(model, [], "cpu")


# ---------------------------------------------------------------------------------------------- stages
def test_tinybert_runs_both_stages(tok, tmp_path):
    teacher = tiny_bert(tok, layers=4, seed=1).eval()
    student = tiny_bert(tok, layers=2, seed=2)
    train = loader(tok, 32, 8)
    rec = Recorder()
    result = Distiller(student, "tinybert", teacher, out_dir=tmp_path, progress=False, device="cpu", log_every=1,
                       callbacks=[rec]).fit(
        [Stage("intermediate", train, epochs=1, lr=1e-3), Stage("prediction", train, epochs=1, lr=1e-3)],
        dev=loader(tok, 16, 16, shuffle=False, offset=500))
    assert [h["stage"] for h in result.history] == ["intermediate", "prediction"]
    assert rec.stages == ["intermediate", "prediction"]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train_recs = [r for r in records if r["kind"] == "train"]
    assert {r["stage"] for r in train_recs} == {"intermediate", "prediction"}
    inter = [r for r in train_recs if r["stage"] == "intermediate"]
    pred = [r for r in train_recs if r["stage"] == "prediction"]
    assert len(inter) == len(pred) == 4  # 32 rows / 8 per batch, logged every step
    # each stage logs its own loss terms
    assert any(k.startswith("embeddings") or k.startswith("hidden") for k in inter[0])
    assert any(k.startswith("soft") for k in pred[0])
    assert result.steps == 8
    assert [r["global_step"] for r in train_recs] == list(range(1, 9))


def test_method_without_loss_in_stage_is_an_error(tok):
    teacher = tiny_bert(tok, layers=4, seed=1).eval()
    with pytest.raises(AutoSKDError, match="method 'tinybert' has no loss in stage 'task'; its stages are: "
                                           "intermediate, prediction"):
        Distiller(tiny_bert(tok), "tinybert", teacher, progress=False, device="cpu").fit(
            [Stage("task", loader(tok, 16, 8), epochs=1)])


# ---------------------------------------------------------------------------------------------- outputs
def test_out_dir_outputs_and_fresh_run_resets_log(tok, tmp_path):
    dev = loader(tok, 16, 16, shuffle=False, offset=500)
    Distiller(tiny_bert(tok), "finetune", None, out_dir=tmp_path, progress=False, device="cpu", log_every=2).fit(
        [Stage("task", loader(tok, 64, 16), epochs=2, lr=1e-3)], dev=dev)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    kinds = [r["kind"] for r in records]
    assert set(kinds) == {"train", "epoch"}
    epochs = [r for r in records if r["kind"] == "epoch"]
    train = [r for r in records if r["kind"] == "train"]
    assert len(epochs) == 2 and all("dev_acc" in r and "dev_loss" in r for r in epochs)
    assert len(train) == 4  # 4 steps per epoch, logged every 2
    assert all({"loss", "lr", "step", "global_step", "stage", "epoch"} <= set(r) for r in train)
    assert all(math.isfinite(r["loss"]) for r in train)
    png = tmp_path / "training.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "checkpoint.pt").is_file()

    # A new run (no resume) in the same folder starts a fresh log.
    Distiller(tiny_bert(tok), "finetune", None, out_dir=tmp_path, progress=False, device="cpu", log_every=2).fit(
        [Stage("task", loader(tok, 32, 16), epochs=1, lr=1e-3)], dev=dev)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["train", "epoch"]
    assert records[-1]["global_step"] == 2


def test_no_out_dir_writes_nothing(tok, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Distiller(tiny_bert(tok), "finetune", None, progress=False, device="cpu").fit(
        [Stage("task", loader(tok, 16, 8), epochs=1)], dev=loader(tok, 8, 8, shuffle=False))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- schedule, clipping
def test_linear_warmup_then_decay(tok, tmp_path):
    rec = Recorder()
    base = 1e-3
    Distiller(tiny_bert(tok), "finetune", None, progress=False, device="cpu", callbacks=[rec], log_every=1,
              out_dir=tmp_path).fit([Stage("task", loader(tok, 64, 8), epochs=1, lr=base, warmup_ratio=0.25)])
    total, warm = 8, 2
    expected = [base * k / warm if k < warm else base * (total - k) / (total - warm) for k in range(total)]
    assert rec.lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert max(rec.lrs) == pytest.approx(base)
    # The logged lr is the one after the step's scheduler update.
    logged = [r["lr"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert logged == pytest.approx(expected[1:] + [0.0], abs=1e-12)


def test_fractional_epochs_stop_mid_epoch(tok):
    rec = Recorder()
    result = Distiller(tiny_bert(tok), "finetune", None, progress=False, device="cpu", callbacks=[rec]).fit(
        [Stage("task", loader(tok, 64, 8), epochs=1.5)])
    assert result.steps == 12 and rec.events.count("step_begin") == 12
    assert rec.events.count("epoch_end") == 2


class GradNorm(Callback):
    """Total gradient norm of the trainable parameters seen after each (clipped) update."""

    def __init__(self):
        self.norms: list[float] = []

    def on_step_end(self, trainer, ctx, batch, losses):
        grads = [p.grad.detach().flatten() for _, p in trainer.trainable_parameters() if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()))


def test_gradient_clipping(tok, monkeypatch):
    def run(max_grad_norm):
        spy = GradNorm()
        Distiller(tiny_bert(tok), "finetune", None, progress=False, device="cpu", callbacks=[spy]).fit(
            [Stage("task", loader(tok, 32, 8), epochs=1, lr=1e-3, max_grad_norm=max_grad_norm)])
        return spy.norms

    unclipped = run(0.0)
    assert min(unclipped) > 1e-2
    clipped = run(1e-3)
    assert len(clipped) == 4 and all(n <= 1e-3 * (1 + 1e-4) for n in clipped), clipped

    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def spy_clip(params, max_norm, *args, **kwargs):
        params = list(params)
        calls.append((len(params), max_norm))
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
    student = tiny_bert(tok)
    n_params = sum(1 for p in student.parameters() if p.requires_grad)
    Distiller(student, "finetune", None, progress=False, device="cpu").fit(
        [Stage("task", loader(tok, 16, 8), epochs=1, max_grad_norm=0.5)])
    assert calls == [(n_params, 0.5)] * 2
    calls.clear()
    Distiller(tiny_bert(tok), "finetune", None, progress=False, device="cpu").fit(
        [Stage("task", loader(tok, 16, 8), epochs=1, max_grad_norm=0.0)])
    assert calls == []


# ---------------------------------------------------------------------------------------------- callbacks
def test_callback_event_order(tok):
    rec = Recorder()
    Distiller(tiny_bert(tok), "finetune", None, progress=False, device="cpu", callbacks=[rec]).fit(
        [Stage("task", loader(tok, 24, 8), epochs=2)], dev=loader(tok, 8, 8, shuffle=False))
    per_epoch = ["step_begin", "step_end"] * 3 + ["epoch_end"]
    assert rec.events == ["stage_start"] + per_epoch * 2 + ["stage_end"]


def test_callback_context_and_metrics(tok):
    seen = []

    class Ctx(Callback):
        def on_step_begin(self, trainer, ctx, batch):
            seen.append(("step", ctx.stage, ctx.epoch, ctx.step, ctx.global_step, ctx.total_steps))

        def on_epoch_end(self, trainer, ctx, metrics):
            seen.append(("epoch", metrics["kind"], metrics["epoch"], "dev_acc" in metrics))

    Distiller(tiny_bert(tok), "finetune", None, progress=False, device="cpu", callbacks=[Ctx()]).fit(
        [Stage("task", loader(tok, 16, 8), epochs=2)], dev=loader(tok, 8, 8, shuffle=False))
    assert seen == [("step", "task", 0, 0, 0, 4), ("step", "task", 0, 1, 1, 4), ("epoch", "epoch", 0, True),
                    ("step", "task", 1, 2, 2, 4), ("step", "task", 1, 3, 3, 4), ("epoch", "epoch", 1, True)]


def test_stage_without_evaluation_has_no_dev_acc(tok):
    result = Distiller(tiny_bert(tok), "finetune", None, progress=False, device="cpu").fit(
        [Stage("task", loader(tok, 16, 8), epochs=1, evaluate=False)], dev=loader(tok, 8, 8, shuffle=False))
    assert "dev_acc" not in result.history[0] and result.best_dev_acc is None


# ---------------------------------------------------------------------------------------------- resume
def _resume_case(tok, tmp_path, dropout: float):
    stages = lambda: [Stage("task", loader(tok, 48, 8, seed=3), epochs=3, lr=1e-3)]  # noqa: E731
    dev = loader(tok, 16, 16, shuffle=False, offset=500)

    full = tiny_bert(tok, dropout=dropout)
    Distiller(full, "finetune", None, out_dir=tmp_path / "full", seed=7, progress=False, device="cpu",
              restore_best=False).fit(stages(), dev=dev)

    killed = tiny_bert(tok, dropout=dropout)
    with pytest.raises(KeyboardInterrupt):
        Distiller(killed, "finetune", None, out_dir=tmp_path / "killed", seed=7, progress=False, device="cpu",
                  restore_best=False, callbacks=[InterruptAt(epoch=1)]).fit(stages(), dev=dev)
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert (ckpt["stage_index"], ckpt["epoch"], ckpt["global_step"]) == (0, 1, 6)

    rec = Recorder()
    resumed = tiny_bert(tok, dropout=dropout, seed=99)  # different init: the checkpoint must win
    result = Distiller(resumed, "finetune", None, out_dir=tmp_path / "killed", seed=7, progress=False,
                       device="cpu", restore_best=False, callbacks=[rec]).fit(stages(), dev=dev, resume=True)
    return full, resumed, result, rec


def test_resume_after_kill_matches_uninterrupted_run(tok, tmp_path):
    full, resumed, result, rec = _resume_case(tok, tmp_path, dropout=0.0)
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert result.steps == 18
    assert rec.events.count("step_begin") == 12  # only the two remaining epochs ran
    assert_same_weights(weights(full), weights(resumed))
    full_log = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    killed_log = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [r["kind"] for r in killed_log] == [r["kind"] for r in full_log]
    assert [r["dev_acc"] for r in killed_log if r["kind"] == "epoch"] == \
        pytest.approx([r["dev_acc"] for r in full_log if r["kind"] == "epoch"])


def test_resume_with_dropout_matches_uninterrupted_run(tok, tmp_path):
    full, resumed, _, _ = _resume_case(tok, tmp_path, dropout=0.1)
    assert_same_weights(weights(full), weights(resumed))


def test_resume_mid_epoch_does_not_duplicate_log_records(tok, tmp_path):
    stages = lambda: [Stage("task", loader(tok, 48, 8, seed=3), epochs=3, lr=1e-3)]  # noqa: E731

    class KillAtStep(Callback):
        def on_step_begin(self, trainer, ctx, batch):
            if ctx.global_step == 9:  # mid-way through the second epoch (6 steps each)
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Distiller(tiny_bert(tok), "finetune", None, out_dir=tmp_path, progress=False, device="cpu", log_every=1,
                  callbacks=[KillAtStep()]).fit(stages())
    Distiller(tiny_bert(tok), "finetune", None, out_dir=tmp_path, progress=False, device="cpu", log_every=1).fit(
        stages(), resume=True)
    steps = [r["global_step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 19))


def test_resume_with_sampled_teacher_continues_the_draws(tok, tmp_path):
    from autoskd.engine.teachers import SampledTeacher, Teacher

    ta, tb = tiny_bert(tok, seed=1).eval(), tiny_bert(tok, seed=3).eval()

    def policy():
        return SampledTeacher({"a": Teacher("a", ta), "b": Teacher("b", tb)}, torch.tensor([0.5, 0.5]), seed=0)

    class Who(Callback):
        def __init__(self):
            self.names = []

        def on_step_end(self, trainer, ctx, batch, losses):
            self.names.append(ctx.teacher_name)

    stages = lambda: [Stage("task", loader(tok, 48, 8, seed=3), epochs=3, lr=1e-3)]  # noqa: E731
    full, full_policy = Who(), policy()
    Distiller(tiny_bert(tok), "kd", full_policy, out_dir=tmp_path / "full", progress=False, device="cpu",
              callbacks=[full]).fit(stages())
    with pytest.raises(KeyboardInterrupt):
        Distiller(tiny_bert(tok), "kd", policy(), out_dir=tmp_path / "k", progress=False, device="cpu",
                  callbacks=[InterruptAt(epoch=1)]).fit(stages())
    resumed, resumed_policy = Who(), policy()
    Distiller(tiny_bert(tok), "kd", resumed_policy, out_dir=tmp_path / "k", progress=False, device="cpu",
              callbacks=[resumed]).fit(stages(), resume=True)
    assert resumed.names == full.names[6:]
    assert resumed_policy.counts == full_policy.counts


def test_resume_without_checkpoint_starts_fresh(tok, tmp_path):
    result = Distiller(tiny_bert(tok), "finetune", None, out_dir=tmp_path, progress=False, device="cpu").fit(
        [Stage("task", loader(tok, 16, 8), epochs=1)], resume=True)
    assert result.steps == 2 and len(result.history) == 1


def test_resume_of_finished_run_trains_nothing(tok, tmp_path):
    stages = [Stage("task", loader(tok, 16, 8), epochs=2)]
    student = tiny_bert(tok)
    Distiller(student, "finetune", None, out_dir=tmp_path, progress=False, device="cpu", restore_best=False).fit(
        stages, dev=loader(tok, 8, 8, shuffle=False))
    done = weights(student)
    rec = Recorder()
    again = tiny_bert(tok, seed=5)
    result = Distiller(again, "finetune", None, out_dir=tmp_path, progress=False, device="cpu", callbacks=[rec],
                       restore_best=False).fit(stages, dev=loader(tok, 8, 8, shuffle=False), resume=True)
    assert rec.events.count("step_begin") == 0 and len(result.history) == 2 and result.steps == 4
    assert_same_weights(done, weights(again))


def test_resume_second_stage(tok, tmp_path):
    """A kill in the second stage resumes there: the finished first stage is not rerun."""
    teacher = tiny_bert(tok, layers=4, seed=1).eval()
    train = loader(tok, 16, 8)
    mk = lambda: [Stage("intermediate", train, epochs=1, lr=1e-3), Stage("prediction", train, epochs=2, lr=1e-3)]  # noqa

    class KillSecondStage(Callback):
        def on_step_begin(self, trainer, ctx, batch):
            if ctx.stage == "prediction" and ctx.epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Distiller(tiny_bert(tok, seed=2), "tinybert", teacher, out_dir=tmp_path, progress=False, device="cpu",
                  callbacks=[KillSecondStage()]).fit(mk())
    rec = Recorder()
    result = Distiller(tiny_bert(tok, seed=2), "tinybert", teacher, out_dir=tmp_path, progress=False, device="cpu",
                       callbacks=[rec]).fit(mk(), resume=True)
    assert rec.stages == ["prediction"] and rec.events.count("step_begin") == 2
    assert [(h["stage"], h["epoch"]) for h in result.history] == [("intermediate", 0), ("prediction", 0),
                                                                   ("prediction", 1)]


# ---------------------------------------------------------------------------------------------- restore best
class SabotageEpoch(Callback):
    """After the last step of ``epoch``, flip the classifier so dev accuracy collapses."""

    def __init__(self, epoch: int, steps_per_epoch: int):
        self.epoch, self.steps_per_epoch = epoch, steps_per_epoch
        self.states: list[tuple] = []

    def on_step_end(self, trainer, ctx, batch, losses):
        if ctx.epoch == self.epoch and ctx.step == (ctx.epoch + 1) * self.steps_per_epoch - 1:
            with torch.no_grad():
                trainer.student.classifier.weight.neg_()
                trainer.student.classifier.bias.neg_()

    def on_epoch_end(self, trainer, ctx, metrics):
        self.states.append((metrics["dev_acc"], weights(trainer.student)))


@pytest.mark.parametrize("restore", [True, False])
def test_restore_best(tok, restore):
    train = loader(tok, 192, 16)
    dev = loader(tok, 64, 32, shuffle=False, offset=1000)
    cb = SabotageEpoch(epoch=2, steps_per_epoch=len(train))
    student = tiny_bert(tok)
    result = Distiller(student, "finetune", None, progress=False, device="cpu", callbacks=[cb],
                       restore_best=restore).fit([Stage("task", train, epochs=3, lr=3e-3)], dev=dev)
    accs = [a for a, _ in cb.states]
    assert accs[-1] < 0.5 < max(accs), accs  # the sabotaged last epoch is the worst
    best = max(range(3), key=lambda i: (accs[i], -i))
    assert result.best_epoch == best and result.best_dev_acc == accs[best] and result.final_dev_acc == accs[-1]
    expected = cb.states[best][1] if restore else cb.states[-1][1]
    assert_same_weights(expected, weights(student), atol=0)


# ---------------------------------------------------------------------------------------------- errors
def test_non_finite_loss_is_an_error(tok):
    class Poison(Callback):
        def on_step_begin(self, trainer, ctx, batch):
            if ctx.global_step == 1:
                with torch.no_grad():
                    trainer.student.classifier.weight.fill_(float("nan"))

    with pytest.raises(AutoSKDError, match=r"loss became nan at step 1; lower the learning rate"):
        Distiller(tiny_bert(tok), "finetune", None, progress=False, device="cpu", callbacks=[Poison()]).fit(
            [Stage("task", loader(tok, 32, 8), epochs=1)])


def test_method_needing_teacher_without_one(tok):
    with pytest.raises(AutoSKDError, match="method 'kd' needs a teacher; pass teachers= or use method 'finetune'"):
        Distiller(tiny_bert(tok), "kd", None, progress=False, device="cpu")


@pytest.mark.parametrize("epochs", [0, -1])
def test_stage_with_no_epochs(tok, epochs):
    with pytest.raises(AutoSKDError, match=r"stage 'task': epochs must be > 0"):
        Distiller(tiny_bert(tok), "finetune", None, progress=False, device="cpu").fit(
            [Stage("task", loader(tok, 16, 8), epochs=epochs)])


def test_stage_with_no_data(tok):
    empty = make_loader(tokenize_split(good_bad(0), tok, MAX_LENGTH), tok, 8, shuffle=False)
    with pytest.raises(AutoSKDError, match="has no training batches"):
        Distiller(tiny_bert(tok), "finetune", None, progress=False, device="cpu").fit([Stage("task", empty)])


def test_errors_are_one_line(tok):
    with pytest.raises(AutoSKDError) as info:
        Distiller(tiny_bert(tok), "kd", None, progress=False, device="cpu")
    assert "\n" not in str(info.value)


def test_step_without_trainable_path_is_skipped(tok):
    """Theseus with replace rate 0 runs the frozen teacher only: the loss has no gradient, so the
    trainer must skip the update rather than fail, and the student's layers stay as they were."""
    student, teacher = tiny_bert(tok, layers=2, seed=1), tiny_bert(tok, layers=4, seed=2)
    distiller = Distiller(student, "theseus", teacher, progress=False, checkpoint=False,
                          method_options={"replace_rate": 0.0})
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = distiller.fit([Stage("task", loader(tok, 32), epochs=1, lr=1e-2)])
    assert result.steps == 2
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
