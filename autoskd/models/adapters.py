"""Architecture adapters: where each feature lives in one model family.

The extraction hooks (``autoskd.engine.hooks``) never touch model code. They need to know
*which* module produces a feature: the embedding block, encoder layer ``i``, the Q/K/V
projections of layer ``i``, the word-embedding matrix. An :class:`ArchitectureAdapter` holds
those module paths (dotted attribute paths, with ``{i}`` standing for the layer index) plus
the model's :class:`Geometry`.

Built-in families are detected from the module structure (so MiniLM, which is a BERT, and
BERT-shaped models such as XLM-R or ELECTRA are found too): BERT/RoBERTa
(``<base>.encoder.layer.{i}.attention.self.query``), MPNet
(``<base>.encoder.layer.{i}.attention.attn.q``) and DistilBERT
(``<base>.transformer.layer.{i}.attention.q_lin``), and the decoder-only causal LMs (see
:data:`_DECODER_FAMILIES`): the Llama family -- Llama/SmolLM, Mistral, Qwen2, Qwen3, Gemma,
Gemma2, Gemma3 text -- (``<base>.layers.{i}.self_attn.q_proj``) and GPT-2
(``<base>.h.{i}.attn.c_attn``). A decoder adapter has ``causal=True`` and an ``attention``
path (the attention module whose call of transformers' attention function is captured for
the attention features, see :mod:`autoskd.engine.decoder_attention`). Any other ``nn.Module``
works when the user passes the paths::

    ArchitectureAdapter.for_model(model, paths={
        "embeddings": "embed", "layer": "blocks.{i}", "query": "blocks.{i}.attn.q",
        "key": "blocks.{i}.attn.k", "value": "blocks.{i}.attn.v",
        "word_embeddings": "embed.tok", "classifier": "head", "num_heads": 4})
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from torch import nn

from ..errors import AutoSKDError

#: Keys a user may put in ``paths`` (module paths) plus ``num_heads`` (an int).
PATH_KEYS = ("embeddings", "layer", "query", "key", "value", "word_embeddings", "classifier",
             "position_bias", "attention", "final_norm")
#: Non-path keys ``paths`` may also hold.
_EXTRA_KEYS = ("num_heads", "input_keys", "causal")
#: Model inputs every family accepts; DistilBERT and MPNet take no ``token_type_ids``.
DEFAULT_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")

_PATHS_HINT = (
    'pass paths={"layer": "encoder.layer.{i}", "query": "encoder.layer.{i}.attn.q", '
    '"key": "...{i}...", "value": "...{i}...", "embeddings": "...", '
    '"word_embeddings": "...", "classifier": "...", "num_heads": N}'
)


@dataclass
class Geometry:
    """Sizes of a model. ``vocab_size``/``num_labels`` are ``None`` when unknown.

    ``num_heads`` counts query heads. ``num_kv_heads`` (grouped-query attention: fewer key/value
    heads than query heads) and ``head_dim`` are set for decoders and ``None`` for encoders,
    where they follow from ``num_heads``/``hidden_size``; ``head_dim`` is the config's own
    value because Gemma and Qwen3 have ``head_dim != hidden_size // num_heads``.
    """

    num_layers: int
    hidden_size: int | None
    num_heads: int | None
    vocab_size: int | None = None
    num_labels: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None

    @property
    def head_size(self) -> int | None:
        """Width of one head: ``head_dim`` when known, else ``hidden_size // num_heads``."""
        if self.head_dim is not None:
            return self.head_dim
        if self.hidden_size is None or not self.num_heads:
            return None
        return self.hidden_size // self.num_heads


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (``""`` is the model itself), or a clear error."""
    if path in ("", "."):
        return model
    module: Any = model
    walked: list[str] = []
    for part in path.split("."):
        child = None
        if isinstance(module, nn.Module):
            child = module._modules.get(part)
            if child is None and not part.isdigit():
                attr = getattr(module, part, None)
                child = attr if isinstance(attr, nn.Module) else None
        if child is None:
            where = ".".join(walked) or type(model).__name__
            raise AutoSKDError(
                f"module path {path!r} does not exist in {type(model).__name__}: "
                f"{where!r} has no submodule {part!r}"
            )
        module = child
        walked.append(part)
    return module


def has_module(model: nn.Module, path: str) -> bool:
    try:
        module_at(model, path)
    except AutoSKDError:
        return False
    return True


# family name -> templates relative to the base model ("" prefix = the base model itself).
_FAMILIES: dict[str, dict[str, Any]] = {
    "bert": {
        "embeddings": "embeddings",
        "layer": "encoder.layer.{i}",
        "query": "encoder.layer.{i}.attention.self.query",
        "key": "encoder.layer.{i}.attention.self.key",
        "value": "encoder.layer.{i}.attention.self.value",
        "word_embeddings": "embeddings.word_embeddings",
        "input_keys": DEFAULT_INPUT_KEYS,
    },
    "mpnet": {
        "embeddings": "embeddings",
        "layer": "encoder.layer.{i}",
        "query": "encoder.layer.{i}.attention.attn.q",
        "key": "encoder.layer.{i}.attention.attn.k",
        "value": "encoder.layer.{i}.attention.attn.v",
        "word_embeddings": "embeddings.word_embeddings",
        # MPNet adds a relative-position bias to every layer's scores; its embedding output
        # [T, T, heads] is captured so attention_scores match the model's own.
        "position_bias": "encoder.relative_attention_bias",
        "input_keys": ("input_ids", "attention_mask"),
    },
    "distilbert": {
        "embeddings": "embeddings",
        "layer": "transformer.layer.{i}",
        "query": "transformer.layer.{i}.attention.q_lin",
        "key": "transformer.layer.{i}.attention.k_lin",
        "value": "transformer.layer.{i}.attention.v_lin",
        "word_embeddings": "embeddings.word_embeddings",
        "input_keys": ("input_ids", "attention_mask"),
    },
}


#: Decoder-only causal LMs (``AutoModelForCausalLM``), detected by ``layer`` + ``attention`` +
#: ``detect``. ``embeddings`` is what decoder layer 0 receives: Gemma's ``embed_tokens`` is a
#: scaled embedding module (its output is already multiplied by sqrt(hidden)); GPT-2 adds
#: token and position embeddings in the model's forward, so the dropout after the sum is the
#: first module whose output is that tensor. ``query``/``key``/``value`` name the raw
#: projections (GPT-2 has one fused ``c_attn``, so none); the attention features of a causal
#: adapter come from the ``attention`` module instead (post-RoPE, see
#: :mod:`autoskd.engine.decoder_attention`). GPT-2 would add ``wte(token_type_ids)`` to its
#: input, so decoders take only input_ids and attention_mask.
_DECODER_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {  # also Mistral, Qwen2/3, Gemma 1/2/3 text, SmolLM, Phi-3-style q/k/v_proj decoders
        "embeddings": "embed_tokens",
        "layer": "layers.{i}",
        "attention": "layers.{i}.self_attn",
        "query": "layers.{i}.self_attn.q_proj",
        "key": "layers.{i}.self_attn.k_proj",
        "value": "layers.{i}.self_attn.v_proj",
        "word_embeddings": "embed_tokens",
        "final_norm": "norm",
        "detect": "layers.{i}.self_attn.q_proj",
        "input_keys": ("input_ids", "attention_mask"),
    },
    "gpt2": {
        "embeddings": "drop",
        "layer": "h.{i}",
        "attention": "h.{i}.attn",
        "word_embeddings": "wte",
        "final_norm": "ln_f",
        "detect": "h.{i}.attn.c_attn",
        "input_keys": ("input_ids", "attention_mask"),
    },
}


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def _count_layers(model: nn.Module, layer_template: str) -> int:
    n = 0
    while has_module(model, layer_template.format(i=n)):
        n += 1
    return n


@dataclass
class ArchitectureAdapter:
    """Feature kind -> module path for one model (templates take ``{i}``, the layer index)."""

    layer: str
    geometry: Geometry
    embeddings: str | None = None
    query: str | None = None
    key: str | None = None
    value: str | None = None
    word_embeddings: str | None = None
    classifier: str | None = None
    position_bias: str | None = None
    attention: str | None = None
    final_norm: str | None = None
    family: str = "custom"
    input_keys: tuple[str, ...] = field(default=DEFAULT_INPUT_KEYS)
    #: A decoder-only causal LM: position t attends to positions <= t, ``hidden:i`` is the
    #: output of decoder layer i (``hidden:-1`` is *before* the final norm ``final_norm``),
    #: ``lm_logits`` is the [B,T,V] next-token logits, and the attention features come from
    #: the ``attention`` module's call of the model's attention function.
    causal: bool = False

    # ------------------------------------------------------------------ paths
    def path(self, kind: str, layer: int | None = None) -> str:
        """The module path for ``kind`` (``"layer"``, ``"query"``, ...) at ``layer``."""
        template = getattr(self, kind, None) if kind in PATH_KEYS else None
        if template is None:
            raise AutoSKDError(
                f"{self.family} adapter has no {kind!r} path; pass paths={{{kind!r}: ...}} "
                f"to ArchitectureAdapter.for_model"
            )
        if "{i}" in template:
            if layer is None:
                raise AutoSKDError(f"path {template!r} for {kind!r} needs a layer index")
            return template.format(i=layer)
        return template

    def module(self, model: nn.Module, kind: str, layer: int | None = None) -> nn.Module:
        return module_at(model, self.path(kind, layer))

    # -------------------------------------------------------------- detection
    @classmethod
    def for_model(cls, model: nn.Module, paths: Mapping[str, Any] | None = None) -> "ArchitectureAdapter":
        """Detect the family of ``model`` (BERT/MiniLM, RoBERTa, MPNet, DistilBERT, and the
        causal LMs Llama/Mistral/Qwen2/Qwen3/Gemma/Gemma2/Gemma3/SmolLM/GPT-2), or use
        user-given ``paths`` (keys: ``layer``, ``query``, ``key``, ``value``, ``embeddings``,
        ``word_embeddings``, ``classifier``, ``position_bias``, ``attention``,
        ``final_norm``, ``num_heads``, ``input_keys``, ``causal``). Given ``paths`` also
        override a detected family's entries."""
        paths = dict(paths or {})
        unknown = set(paths) - set(PATH_KEYS) - set(_EXTRA_KEYS)
        if unknown:
            raise AutoSKDError(
                f"unknown key(s) in paths: {', '.join(sorted(unknown))}; "
                f"known: {', '.join(PATH_KEYS + _EXTRA_KEYS)}"
            )
        detected = _detect(model)
        if detected is None and "layer" not in paths:
            raise AutoSKDError(
                f"autoskd does not know the architecture {type(model).__name__} "
                f"(known: BERT/MiniLM, RoBERTa, MPNet, DistilBERT, Llama/Mistral/Qwen2/Qwen3/"
                f"Gemma/Gemma2/Gemma3/SmolLM, GPT-2); {_PATHS_HINT}"
            )
        family, entries = detected if detected is not None else ("custom", {})
        entries.update({k: v for k, v in paths.items() if k in PATH_KEYS or k in ("input_keys", "causal")})
        for k in ("layer", "query", "key", "value", "attention"):
            t = entries.get(k)
            if t is not None and "{i}" not in t:
                raise AutoSKDError(f"paths[{k!r}] = {t!r} must contain '{{i}}' for the layer index")
        for k in PATH_KEYS:
            t = entries.get(k)
            if t is not None:
                module_at(model, t.format(i=0) if "{i}" in t else t)  # fail early, naming the path
        input_keys = tuple(entries.pop("input_keys", DEFAULT_INPUT_KEYS))
        causal = bool(entries.pop("causal", False))
        geometry = _geometry(model, entries, paths.get("num_heads"), causal)
        return cls(geometry=geometry, family=family, input_keys=input_keys, causal=causal,
                   **{k: entries.get(k) for k in PATH_KEYS})

    def with_paths(self, **paths: Any) -> "ArchitectureAdapter":
        return replace(self, **paths)


def _detect(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    prefixes = []
    base_prefix = getattr(model, "base_model_prefix", "")
    if base_prefix and isinstance(getattr(model, base_prefix, None), nn.Module):
        prefixes.append(base_prefix)
    prefixes.append("")
    decoder = _detect_decoder(model, prefixes)
    if decoder is not None:
        family, entries = decoder
        return (model_type if isinstance(model_type, str) and model_type else family), entries
    for family, templates in _FAMILIES.items():
        for prefix in prefixes:
            if not (has_module(model, _join(prefix, templates["layer"].format(i=0)))
                    and has_module(model, _join(prefix, templates["query"].format(i=0)))):
                continue
            entries: dict[str, Any] = {}
            for k, v in templates.items():
                entries[k] = v if k == "input_keys" else _join(prefix, v)
            entries["classifier"] = "classifier" if has_module(model, "classifier") else None
            name = model_type if isinstance(model_type, str) and model_type else family
            return name, entries
    return None


def _detect_decoder(model: nn.Module, prefixes: list[str]) -> tuple[str, dict[str, Any]] | None:
    """A decoder family whose ``detect`` module exists under one of ``prefixes``."""
    for family, templates in _DECODER_FAMILIES.items():
        for prefix in prefixes:
            if not (has_module(model, _join(prefix, templates["detect"].format(i=0)))
                    and has_module(model, _join(prefix, templates["embeddings"]))):
                continue
            entries: dict[str, Any] = {k: (v if k == "input_keys" else _join(prefix, v))
                                       for k, v in templates.items() if k != "detect"}
            entries["causal"] = True
            entries["classifier"] = None  # the LM head's output is lm_logits, not class logits
            return family, entries
    return None


def _geometry(model: nn.Module, entries: Mapping[str, Any], num_heads: Any, causal: bool = False) -> Geometry:
    config = getattr(model, "config", None)
    num_layers = _count_layers(model, entries["layer"])
    if num_layers == 0:
        raise AutoSKDError(f"no layer found at {entries['layer'].format(i=0)!r}; check paths['layer']")

    def cfg(name: str) -> Any:
        try:
            return getattr(config, name, None) if config is not None else None
        except Exception:  # some configs raise on missing attribute-map targets
            return None

    hidden = cfg("hidden_size")
    heads = num_heads if num_heads is not None else cfg("num_attention_heads")
    vocab = cfg("vocab_size")
    labels = cfg("num_labels")
    if hidden is None and entries.get("query"):
        q = module_at(model, entries["query"].format(i=0))
        hidden = getattr(q, "out_features", None)
    if vocab is None and entries.get("word_embeddings"):
        emb = module_at(model, entries["word_embeddings"])
        vocab = getattr(emb, "num_embeddings", None)
    if entries.get("classifier"):
        head = module_at(model, entries["classifier"])
        out = getattr(head, "out_features", None)
        if out is None:  # e.g. RobertaClassificationHead: last Linear inside it
            linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
            out = linears[-1].out_features if linears else None
        if labels is None or (out is not None and config is None):
            labels = out
    if heads is None and entries.get("query"):
        raise AutoSKDError(
            f"{type(model).__name__} has no config giving the number of attention heads; "
            f'add "num_heads": N to paths'
        )
    head_dim = cfg("head_dim")
    if heads is not None:
        heads = int(heads)
        if head_dim is None and hidden is not None and hidden % heads:
            raise AutoSKDError(f"hidden size {hidden} is not divisible by num_heads={heads}")
    kv_heads = cfg("num_key_value_heads")
    if causal:
        # config.num_labels defaults to 2 on every config; a causal LM's logits are vocab-wide.
        labels = None
        if kv_heads is None:
            kv_heads = heads
        if head_dim is None and hidden is not None and heads:
            head_dim = hidden // heads
    return Geometry(num_layers=num_layers, hidden_size=hidden, num_heads=heads,
                    vocab_size=vocab, num_labels=labels,
                    num_kv_heads=None if kv_heads is None else int(kv_heads),
                    head_dim=None if head_dim is None else int(head_dim))
