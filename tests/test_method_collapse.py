"""Why methods ended at the majority class, and the fixes (issue 25; measurements in
benchmarks/README.md, "methods table"): the classifier head pools the way its checkpoint was
trained; each method's stage that trains the classifier gets the run's budget and is the one
restored; the methods table's aggregation (means, intervals, pairing with kd and finetune)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertModel

from autoskd.errors import AutoSKDError
from autoskd.models.loading import load_classifier, pooling_of, save_student, use_mean_pooling
from autoskd.models.pooling import MeanPooler, checkpoint_pooling
from helpers import load_benchmark, tiny_config


# ---------------------------------------------------------------------------------------------- the head
def _sentence_transformers_folder(path, modes: dict, tokenizer) -> str:
    """A tiny BERT body saved the way sentence-transformers saves one (modules.json + Pooling)."""
    torch.manual_seed(7)
    BertModel(tiny_config(layers=2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False, **modes}))
    return str(path)


@pytest.fixture(scope="module")
def mean_dir(tmp_path_factory, real_tokenizer):
    return _sentence_transformers_folder(tmp_path_factory.mktemp("st-mean"), {"pooling_mode_mean_tokens": True},
                                         real_tokenizer)


def test_a_mean_pooled_sentence_checkpoint_gets_a_mean_pooling_head(mean_dir, tiny_dir, real_tokenizer):
    """all-MiniLM-L6-v2 was trained to mean-pool its tokens; its [CLS] pooler never trained. The
    classifier built from such a checkpoint averages the real tokens (padding does not move it);
    a plain BERT checkpoint keeps BERT's [CLS] pooler."""
    model = load_classifier(mean_dir, num_labels=2).eval()
    assert isinstance(model.bert.pooler, MeanPooler) and pooling_of(model) == "mean"
    assert model.config.classifier_pooling == "mean"
    assert pooling_of(load_classifier(str(tiny_dir), num_labels=2)) == "cls"
    assert pooling_of(load_classifier(mean_dir, num_labels=2, pooling="cls")) == "cls"  # opt out
    with torch.no_grad():
        batch = real_tokenizer(["a good film", "bad"], padding=True, return_tensors="pt")
        both = model(**batch).logits
        alone = model(**real_tokenizer(["bad"], return_tensors="pt")).logits
        assert torch.allclose(both[1], alone[0], atol=1e-5)  # the padded row's logits = the row alone
        hidden = model.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        assert torch.allclose(model.classifier(pooled), both, atol=1e-5)


@pytest.mark.parametrize("modes,expected", [({"pooling_mode_mean_tokens": True}, "mean"),
                                            ({"pooling_mode_cls_token": True}, "cls"),
                                            ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, "cls")])
def test_checkpoint_pooling_reads_the_sentence_transformers_config(tmp_path, real_tokenizer, modes, expected):
    assert checkpoint_pooling(_sentence_transformers_folder(tmp_path / "m", modes, real_tokenizer)) == expected


def test_the_mean_head_survives_copies_saves_and_reloads(mean_dir, tmp_path, real_tokenizer):
    """A deep copy hooks its own pooler; the saved folder reloads with the same head through
    autoskd and through transformers (trust_remote_code: the head's code is written beside it)."""
    import copy

    model = load_classifier(mean_dir, num_labels=2, layers=1).eval()
    batch = real_tokenizer(["a good film", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**batch).logits
        twin = copy.deepcopy(model)
        assert torch.equal(twin(**batch).logits, want)
        twin.bert.pooler.mask = None  # the copy's own hook sets its own pooler's mask
        twin(**real_tokenizer(["x"], return_tensors="pt"))
        assert model.bert.pooler.mask.shape == batch["attention_mask"].shape
        out = save_student(model, real_tokenizer, tmp_path / "student", label_names=["neg", "pos"])
        ours = load_classifier(str(out), num_labels=2).eval()
        theirs = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
        assert pooling_of(ours) == "mean" and torch.allclose(ours(**batch).logits, want, atol=1e-6)
        assert torch.allclose(theirs(**batch).logits, want, atol=1e-6)


def test_mean_pooling_needs_a_pooler():
    class NoPooler(torch.nn.Module):
        pass

    with pytest.raises(AutoSKDError, match="no \\[CLS\\] pooler.*pooling 'cls'"):
        use_mean_pooling(NoPooler())
    with pytest.raises(AutoSKDError, match="unknown pooling 'max'"):
        load_classifier("minilm-l6", num_labels=2, pooling="max")


# ---------------------------------------------------------------------------------------------- the table
def test_methods_table_pairs_every_method_with_kd_and_finetune():
    """The table's keys (issue 25), the mean and 95% interval over seeds, and the per-seed paired
    difference to each baseline on the seeds both finished."""
    table_mod = load_benchmark("methods_table")
    labels = [1, 1, 0, 1]

    def run(name, seed, preds):
        acc = sum(p == y for p, y in zip(preds, labels)) / len(labels)
        return {"method": name, "seed": seed, "dev_acc": acc, "test_acc": acc, "test_predictions": preds,
                "test_majority_share": sum(p == 1 for p in preds) / len(preds), "wall_seconds": 60.0, "steps": 10,
                "stages": [{"stage": "task", "epochs": 6, "lr": 5e-4, "steps": 10}], "history": []}

    runs = {"finetune": [run("finetune", s, [1, 1, 1, 1]) for s in (0, 1, 2)],
            "kd": [run("kd", 0, [1, 1, 0, 0]), run("kd", 1, [1, 1, 0, 1]), run("kd", 2, [1, 0, 0, 1])],
            "pkd": [run("pkd", 0, [1, 1, 0, 1]), run("pkd", 2, [1, 1, 0, 1])]}
    table = table_mod.aggregate(runs, labels)
    kd = table["kd"]
    assert kd["seeds"] == [0, 1, 2] and kd["test_acc_mean"] == pytest.approx(2.5 / 3)  # 0.75, 1, 0.75
    lo, hi = kd["test_acc_ci"]
    assert lo < 2.5 / 3 < hi and kd["dev_acc_ci"] == kd["test_acc_ci"]
    assert table["finetune"]["test_majority_share"] == 1.0  # predicts one class
    vs = table["pkd"]["test_vs_kd"]  # pkd has seeds 0 and 2: paired on those two only
    assert vs["seeds"] == [0, 2] and vs["mean"] == pytest.approx(((1 - 0.75) + (1 - 0.75)) / 2)
    assert table["pkd"]["test_vs_finetune"]["mean"] == pytest.approx(0.25)
    assert "test_vs_kd" not in table["kd"] and table["kd"]["test_vs_finetune"]["seeds"] == [0, 1, 2]
    assert table["kd"]["test_vs_finetune"]["mcnemar"]["rows"] == 12  # 3 seeds x 4 rows, pooled


def test_the_step_a_run_left_the_majority_class_counts_earlier_stages():
    table_mod = load_benchmark("methods_table")
    run = {"stages": [{"stage": "intermediate", "epochs": 2.0, "steps": 64}, {"stage": "prediction", "epochs": 2.0,
                                                                            "steps": 64}],
           "history": [{"stage": "intermediate", "epoch": 0, "dev_acc": 0.59}, {"stage": "intermediate", "epoch": 1,
                                                                               "dev_acc": 0.60},
                       {"stage": "prediction", "epoch": 0, "dev_acc": 0.70}, {"stage": "prediction", "epoch": 1}]}
    assert table_mod.leaving_majority(run, 0.59) == {"stage": "prediction", "epoch": 0, "step": 96}
    assert table_mod.leaving_majority(run, 0.69) is None


def test_gkd_headline_directions_are_paired_over_seeds():
    """GKD's comparisons (TinyBERT above each single-teacher method; task-stage distillation above
    hard labels alone): same / opposite / tie from the paired interval, and the rank correlation
    with GKD's Table 2 over the methods both ran."""
    gkd = load_benchmark("gkd_directions")

    def runs(accs):
        return {"runs": [{"seed": s, "test_acc": a} for s, a in enumerate(accs)], "test_acc_mean": sum(accs) / 3}

    table = {"tinybert": runs([0.80, 0.82, 0.81]), "kd": runs([0.70, 0.71, 0.69]), "pkd": runs([0.81, 0.84, 0.80]),
             "minilm": runs([0.85, 0.86, 0.84]), "finetune": runs([0.72, 0.70, 0.71])}
    out = gkd.check_directions(table)
    by = {(p["better"], p["worse"]): p for p in out["pairs"]}
    assert by[("tinybert", "kd")]["direction"] == "same"           # +0.11 on every seed
    assert by[("tinybert", "minilm")]["direction"] == "opposite"   # -0.04 on every seed
    assert by[("tinybert", "pkd")]["direction"] == "tie"           # -0.01, +/- 0.02
    assert by[("kd", "finetune")]["direction"] == "tie"            # -0.01, 0, -0.02 ... inside the noise
    assert ("tinybert", "sid") not in by and out["counts"] == {"same": 1, "tie": 2, "opposite": 1}
    rho = out["spearman_vs_gkd_table2"]
    assert rho["methods"] == 4 and -1 <= rho["rho"] <= 1  # finetune is not in GKD's Table 2


# ---------------------------------------------------------------------------------------------- stages
FILLERS = ["movie", "film", "plot", "story", "cast", "show", "script", "scene"]


def _good_bad(tok, n: int, offset: int = 0, shuffle: bool = True):
    import datasets

    from autoskd.data.collate import make_loader, tokenize_split

    texts = [f"{'good' if (i + offset) % 2 else 'bad'} {FILLERS[(i + offset) % 8]} {FILLERS[((i + offset) // 8) % 8]}"
             for i in range(n)]
    ds = datasets.Dataset.from_dict({"text": texts, "label": [(i + offset) % 2 for i in range(n)],
                                     "idx": list(range(n))})
    return make_loader(tokenize_split(ds, tok, 16), tok, 16, shuffle=shuffle, seed=0)


def test_sid_trains_and_restores_the_classifier_in_a_stage_of_its_own(tok):
    """SID's last phase (soft labels) is the only one that trains the classifier. As one stage cut
    into L + 1 phases, that phase had 1/(L+1) of the budget and the epoch restored could come from
    a phase where the classifier never trained (the first table's SID: every row the minority
    class). Now it is the ``prediction`` stage: the run's epochs, and the stage restored."""
    import autoskd.methods  # noqa: F401
    from autoskd.engine.callbacks import Callback
    from autoskd.engine.teachers import SingleTeacher, Teacher
    from autoskd.engine.trainer import Distiller, Stage
    from autoskd.methods import get_method
    from helpers import tiny_bert

    method = get_method("sid")
    assert method.spec.stages == ("intermediate", "prediction")
    assert {l.name for l in method.spec.losses_for("intermediate")} == {"attention", "cls"}
    assert {l.name for l in method.spec.losses_for("prediction")} == {"soft"}
    seen: dict[str, set] = {}

    class Terms(Callback):
        def on_step_end(self, trainer, ctx, batch, losses):
            seen.setdefault(ctx.stage, set()).update(k.split(":")[0] for k in losses)

    teacher = tiny_bert(tok, layers=4, seed=1, dropout=0.0)
    student = tiny_bert(tok, layers=2, seed=2, dropout=0.0)
    train, dev = _good_bad(tok, 64), _good_bad(tok, 32, offset=1000, shuffle=False)
    result = Distiller(student, method, SingleTeacher(Teacher("t", teacher)), progress=False, device="cpu",
                       callbacks=[Terms()]).fit([Stage(s, train, epochs=2, lr=3e-3) for s in method.spec.stages],
                                                dev=dev)
    assert seen["intermediate"] >= {"attention_kl", "cls_cosine"} and "soft_soft_ce" not in seen["intermediate"]
    assert seen["prediction"] == {"soft_soft_ce", "loss"}
    assert [h["stage"] for h in result.history] == ["intermediate"] * 2 + ["prediction"] * 2
    assert result.best_epoch in (2, 3)  # restored from the stage that trains the classifier
