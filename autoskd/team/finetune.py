"""Fine-tuning one spec teacher on the task, through the engine's one loop (method ``finetune``).

The run writes into ``<entry>.partial`` and renames it to the cache entry only when the
weights and ``meta.json`` are complete, so an interrupted build never leaves an entry that
looks finished; ``resume=True`` continues an interrupted fine-tuning from its last epoch.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ..models.loading import count_layers, count_parameters, load_classifier, save_student
from .probe import first_param_device
from .report import safe
from .spec import ModelSpec, _sha256


def set_label_names(model: nn.Module, label_names: list[str]) -> None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_labels", None) == len(label_names):
        config.id2label = dict(enumerate(label_names))
        config.label2id = {n: i for i, n in enumerate(label_names)}


def finetune_teacher(name: str, spec: ModelSpec, key: str, entry: Path, task, train_tok, dev_tok, tokenizer,
                     max_length: int, seed: int, progress: bool, force: bool) -> tuple[nn.Module, dict]:
    """Fine-tune ``spec`` on ``train_tok`` (tokenised by ``tokenizer``), save it with that
    tokenizer into ``entry`` and return ``(model, meta)``."""
    from ..data.collate import TokenizedSplit, make_loader
    from ..engine.trainer import Distiller, Stage, evaluate
    from ..methods import get_method

    s = spec.finetune
    partial = entry.with_name(entry.name + ".partial")
    if force:
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    data = train_tok
    if s.max_train_examples is not None and s.max_train_examples < len(train_tok):
        gen = torch.Generator().manual_seed(seed)
        keep = sorted(torch.randperm(len(train_tok), generator=gen)[: s.max_train_examples].tolist())
        data = TokenizedSplit({k: [v[i] for i in keep] for k, v in train_tok.columns.items()})
    train_loader = make_loader(data, tokenizer, batch_size=s.batch_size, shuffle=True, seed=seed)
    dev_loader = make_loader(dev_tok, tokenizer, batch_size=max(64, s.batch_size), shuffle=False)
    model = load_classifier(spec.source, num_labels=task.num_labels, layers=spec.layers, init=spec.init, seed=seed)
    set_label_names(model, list(task.label_names))
    start = time.time()
    result = Distiller(student=model, method=get_method("finetune"), teachers=None, out_dir=partial / "run", seed=seed,
                       progress=progress).fit(
        stages=[Stage(name="finetune", train=train_loader, epochs=s.epochs, lr=s.lr,
                      warmup_ratio=s.warmup_ratio, weight_decay=s.weight_decay)],
        dev=dev_loader, resume=True)
    dev_acc = result.best_dev_acc
    if dev_acc is None:
        dev_acc = evaluate(model, dev_loader, first_param_device(model))["accuracy"]
    model = model.cpu()
    (partial / "run" / "checkpoint.pt").unlink(missing_ok=True)  # optimizer state: not needed once done
    save_student(model, tokenizer, partial, label_names=list(task.label_names))
    meta = {"name": name, "hash": key, "weights_id": _sha256({"hash": key, "built": time.time_ns()}),
            "dev_accuracy": float(dev_acc), "final_dev_accuracy": result.final_dev_acc,
            "spec": spec.to_dict(), "layers": safe(lambda: count_layers(model)),
            "parameters": count_parameters(model), "task": task.name,
            "train_fingerprint": task.fingerprint("train_full"), "dev_fingerprint": task.fingerprint("dev"),
            "max_length": max_length, "seed": seed, "seconds": round(time.time() - start, 2),
            "history": result.history}
    (partial / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    if entry.exists():
        shutil.rmtree(entry)
    partial.rename(entry)
    return model, meta
