"""benchmarks/one_step_signal.py's two one-step θ signals match finite differences: the task
signal is the drop in val cross-entropy per unit step on one teacher, the distill signal is
first-order SSWO's θ-gradient; a missing run folder is a one-line error."""

import pytest
import torch
from torch.nn import functional as F

from autoskd.engine.batches import model_inputs, output_logits
from autoskd.engine.losses import ce
from autoskd.search.theta_step import distillation_loss, sswo_direct_grads

from helpers import load_benchmark, tiny_bert


@pytest.fixture(scope="module")
def oss():
    return load_benchmark("one_step_signal")


def _batch(tok, texts, labels):
    enc = tok(texts, padding=True, return_tensors="pt")
    return {**enc, "labels": torch.tensor(labels)}


def test_task_alignment_is_the_val_loss_drop_per_unit_step(oss, tok):
    student = tiny_bert(tok, seed=3, dropout=0.0).double().eval()
    val = _batch(tok, ["a good film", "bad and dull", "fine acting", "a mess"], [1, 0, 1, 0])
    train = _batch(tok, ["great fun", "boring plot", "lovely", "awful"], [1, 0, 1, 0])
    torch.manual_seed(0)
    teachers = [torch.randn(4, 2, dtype=torch.float64) * s for s in (0.5, 2.0, 4.0)]
    a = oss.task_alignment(student, val, train, teachers)
    params = [p for p in student.parameters() if p.requires_grad]

    def val_loss():
        with torch.no_grad():
            return F.cross_entropy(output_logits(student(**model_inputs(val))), val["labels"]).item()

    eps = 1e-4
    for i, z in enumerate(teachers):
        grads = torch.autograd.grad(ce(output_logits(student(**model_inputs(train))), z, temperature=1.0), params)

        def val_loss_after(step):
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(step * g)
                loss = F.cross_entropy(output_logits(student(**model_inputs(val))), val["labels"]).item()
                for p, g in zip(params, grads):
                    p.add_(step * g)
            return loss

        fd = (val_loss_after(-eps) - val_loss_after(eps)) / (2 * eps)  # central: error O(eps^2)
        assert a[i].item() == pytest.approx(fd, rel=1e-5)
    assert len(set(round(v, 6) for v in a.tolist())) == 3  # the teachers really differ


def test_distill_direct_gradient_matches_finite_differences():
    torch.manual_seed(1)
    student_logits = torch.randn(6, 2, dtype=torch.float64)
    teachers = [torch.randn(6, 2, dtype=torch.float64) * s for s in (1.0, 3.0)]
    g = sswo_direct_grads(student_logits, torch.stack(teachers), torch.full((2,), 0.5, dtype=torch.float64), [0, 1],
                          "theta", None, 1.0, 1.0)
    eps = 1e-6
    for i, z in enumerate(teachers):
        def loss(t):
            return distillation_loss(student_logits, t * z, None, 1.0, 1.0).item()
        fd = (loss(0.5 + eps) - loss(0.5 - eps)) / (2 * eps)  # uniform theta over 2 teachers
        assert g[i].item() == pytest.approx(fd, rel=1e-5)


def test_missing_run_dir_is_a_one_line_error(oss, tmp_path):
    with pytest.raises(SystemExit) as e:
        oss.main(["--run-dir", str(tmp_path / "nope")])
    msg = str(e.value)
    assert "--run-dir" in msg and "does not exist" in msg and "\n" not in msg
