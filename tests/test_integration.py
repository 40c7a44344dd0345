"""End to end on the real data and weights: rotten_tomatoes, teachers and student cut from
all-MiniLM-L6-v2 (``minilm-l6``), a teacher fine-tuned through the team, a student distilled
with ``kd`` through ``pipeline.distill``, and the saved student reloaded with plain transformers.

Budget: well under 3 minutes on 2 CPU cores (one intra-op thread, which also makes the run
bit-for-bit reproducible).

Measured settings (seed 0, this machine): with 400 training rows and the teacher at lr 1e-4 for
2 epochs, neither the teacher nor the student leaves the majority class (dev 0.59 = majority):
MiniLM's sentence-embedding checkpoint has no trained pooler and needs a high learning rate.
With 800 training rows (train + val halves of 400 each), lr 5e-4, batch 16: majority 0.62,
teacher (2 epochs) 0.695, student (kd with alpha 0.5, i.e. soft and hard targets, 3 epochs)
dev 0.695, test 0.715. With pure soft targets (alpha 1) and 2 epochs the student reached only
0.625-0.665, so the margin asserted below relies on the hard-label half of the loss.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

pytestmark = pytest.mark.integration

SEED = 0
MAX_LENGTH = 48


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from autoskd.data.collate import make_loader, tokenize_split
    from autoskd.data.tasks import load_task
    from autoskd.pipeline import DistillConfig, distill
    from autoskd.team import FinetuneSettings, ModelSpec, TeacherTeam

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("integration")
        task = load_task("rotten_tomatoes", seed=SEED).subsample(400, 200, seed=SEED)
        team = TeacherTeam(student=ModelSpec("minilm-l6", layers=1, init="pretrained"),
                           teachers={"minilm-L2": ModelSpec("minilm-l6", layers=2,
                                                            finetune=FinetuneSettings(epochs=2, lr=5e-4,
                                                                                      batch_size=16))},
                           max_length=MAX_LENGTH, name="integration")
        team.build(task, cache_dir=root / "teachers", seed=SEED, progress=False)
        config = DistillConfig(method="kd", method_options={"alpha": 0.5}, epochs=3, lr=5e-4, batch_size=16,
                               max_length=MAX_LENGTH, seed=SEED)
        outcome = distill(team, task, config, out_dir=root / "run", cache_dir=root / "cache", progress=False)
        dev_loader = make_loader(tokenize_split(task.split("dev"), team.tokenizer, MAX_LENGTH), team.tokenizer,
                                 64, shuffle=False)
        yield task, team, outcome, dev_loader
    finally:
        torch.set_num_threads(threads)


def majority_rate(task) -> float:
    labels = list(task.split("dev")["label"])
    return max(labels.count(c) for c in set(labels)) / len(labels)


def test_student_beats_majority(run):
    task, team, outcome, _ = run
    assert task.sizes() == {"train": 400, "val": 400, "dev": 200, "test": 200}
    majority = majority_rate(task)
    print(f"majority {majority:.3f}  teacher {team.dev_accuracy}  student dev {outcome.dev_acc:.3f} "
          f"test {outcome.test_acc:.3f}  {outcome.result.seconds:.0f}s")
    assert team.status == {"minilm-L2": "built"}
    assert outcome.dev_acc > majority + 0.03, (majority, team.dev_accuracy, outcome.dev_acc)
    assert [h["epoch"] for h in outcome.result.history] == [0, 1, 2]


@torch.no_grad()
def test_saved_student_reloads_with_plain_transformers(run):
    _, team, outcome, dev_loader = run
    folder = outcome.out_dir / "student"
    # all-MiniLM-L6-v2's student has the mean-pooling head its checkpoint was trained with (issue
    # 25); the folder carries that head's code, which transformers runs on trust_remote_code
    assert json.loads((folder / "config.json").read_text())["classifier_pooling"] == "mean"
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("a fine film")["input_ids"] == team.tokenizer("a fine film")["input_ids"]
    assert reloaded.config.num_hidden_layers == 1
    assert reloaded.config.id2label == {0: "rotten", 1: "fresh"}
    student = outcome.student.eval()
    device = next(student.parameters()).device
    for batch in dev_loader:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        mine = student(**{k: v.to(device) for k, v in inputs.items()}).logits.cpu()
        theirs = reloaded(**inputs).logits
        assert torch.equal(mine.argmax(-1), theirs.argmax(-1))
        assert torch.allclose(mine, theirs, atol=1e-5)
    assert (outcome.out_dir / "result.json").is_file() and not (outcome.out_dir / "checkpoint.pt").exists()
