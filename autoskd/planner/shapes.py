"""Model shapes for the memory planner, with parameter counts taken from a module built on the
``meta`` device (no memory is used, so a 100B model "builds" in milliseconds).

A shape comes from one of:

* a size name of GKD's table 8 (``"100B"``, ``"20B"``, ``"110M"``, ...): a GLM-shaped model,
* a Hugging Face config: a local folder, a ``config.json`` path, a hub id or an alias
  (``"minilm-l6"``); a ``layers=`` override cuts it down (the 2-layer student of a 6-layer teacher),
* explicit numbers: ``"layers=24,hidden=1024,vocab=30592"`` (heads/ffn/positions optional;
  ``kv_heads``, ``gated``, ``tied`` make it a Llama-shaped decoder),
* a named Llama-family decoder (``"llama3-70b"``, ``"llama3-8b"``, ``"llama3.2-1b"``,
  ``"llama2-7b"``, ...; :mod:`autoskd.planner.decoders`), numbers from the published configs.

GLM-shaped models follow table 8's count ``N = L(12h^2 + 13h) + (V + 2P)h + 4h``: each layer has
QKV (3h^2+3h), the attention output (h^2+h), two LayerNorms (4h) and a 4h-wide MLP (8h^2+5h);
GLM's 2-D positional encoding has two position tables (2Ph); the remaining 4h are two LayerNorms
(final, embedding output). The counts are checked against every row of table 8 in the tests.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import AutoSKDError

#: GKD table 8: size name -> (layers, hidden, heads, vocab, max positions, #parameters printed there).
TABLE8: dict[str, tuple[int, int, int, int, int, int]] = {
    "22M": (6, 384, 12, 30592, 512, 22788864),
    "66M": (6, 768, 12, 30592, 512, 66811392),
    "110M": (12, 768, 12, 30592, 512, 109338624),
    "340M": (24, 1024, 16, 30592, 512, 334688256),
    "1B": (26, 1728, 64, 50304, 1024, 1022682240),
    "1.2B": (28, 1792, 64, 50304, 1024, 1173458944),
    "1.5B": (30, 1984, 64, 50304, 1024, 1521700224),
    "2B": (36, 2048, 64, 50304, 1024, 1920122880),
    "5B": (38, 3264, 64, 50304, 1024, 5030587776),
    "6B": (40, 3456, 64, 50304, 1024, 5915828736),
    "7.5B": (42, 3776, 64, 50304, 1024, 7385878656),
    "10B": (48, 4096, 64, 50304, 1024, 9880682496),
    "13B": (48, 4736, 64, 50304, 1024, 13170418176),
    "18B": (54, 5248, 64, 50304, 1024, 18125342976),
    "20B": (56, 5440, 64, 50304, 1024, 20175676160),
    "22B": (60, 5504, 64, 50304, 1024, 22104152064),
    "25B": (64, 5632, 64, 50304, 1024, 24660072448),
    "50B": (64, 8000, 64, 50304, 1024, 49577504000),
    "65B": (64, 9152, 64, 50304, 1024, 64813768448),
    "90B": (66, 10624, 64, 50304, 1024, 89957891328),
    "100B": (68, 11008, 64, 50304, 1024, 99465734144),
    "110B": (70, 11392, 64, 50304, 1024, 109620044032),
}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a transformer (all counts per full model)."""

    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    params: int  #: counted on the meta device
    #: Decoder details (Llama family). GLM/BERT-shaped models keep the defaults: as many
    #: key/value heads as query heads, a 2-matrix MLP, LayerNorm, the word embeddings tied to
    #: the output layer (GLM's and BERT's MLM heads reuse them).
    kv_heads: int = 0            #: key/value heads (grouped-query attention); 0 = ``heads``
    head_dim: int = 0            #: per-head width; 0 = ``hidden // heads``
    gated: bool = False          #: gate/up/down MLP (3 matrices of hidden x ffn, SwiGLU)
    tied: bool = True            #: output layer shares the word-embedding matrix
    norm: str = "layernorm"      #: "layernorm" (weight + bias) or "rmsnorm" (weight only)
    family: str = "glm"          #: "glm" (GLM/BERT-shaped encoder) or "decoder" (Llama-family causal LM)

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden // max(1, self.heads)

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_width

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_width

    @property
    def decoder(self) -> bool:
        return self.family == "decoder"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------- GLM
class _GLMLayer(nn.Module):
    def __init__(self, h: int, ffn: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(h)
        self.query_key_value = nn.Linear(h, 3 * h)
        self.attention_dense = nn.Linear(h, h)
        self.post_attention_layernorm = nn.LayerNorm(h)
        self.dense_h_to_4h = nn.Linear(h, ffn)
        self.dense_4h_to_h = nn.Linear(ffn, h)


class GLMShapedModel(nn.Module):
    """A GLM-shaped transformer body (GLM's modules, no forward): built on ``meta`` only to count."""

    def __init__(self, layers: int, hidden: int, vocab: int, max_positions: int, ffn: int | None = None):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.block_position_embeddings = nn.Embedding(max_positions, hidden)
        self.embedding_layernorm = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(_GLMLayer(hidden, ffn or 4 * hidden) for _ in range(layers))
        self.final_layernorm = nn.LayerNorm(hidden)


def meta_module(build) -> nn.Module:
    """The module ``build()`` makes, on the meta device (no memory used)."""
    with torch.device("meta"):
        return build()


def count_meta_params(build) -> int:
    """Parameters of the module ``build()`` makes, built on the meta device (no memory used);
    a parameter shared by two modules (tied embeddings) counts once."""
    return sum(p.numel() for p in meta_module(build).parameters())


def glm_shape(name: str, layers: int, hidden: int, heads: int, vocab: int, max_positions: int,
              ffn: int | None = None) -> ModelShape:
    ffn = ffn or 4 * hidden
    params = count_meta_params(lambda: GLMShapedModel(layers, hidden, vocab, max_positions, ffn))
    return ModelShape(name, layers, hidden, heads, ffn, vocab, max_positions, params)


def table8_shape(size: str) -> ModelShape:
    """The GLM-shaped model of GKD table 8 named ``size`` (``"100B"``, ``"110M"``, ...)."""
    key = size.strip().upper()
    match = {k.upper(): k for k in TABLE8}.get(key)
    if match is None:
        raise AutoSKDError(f"unknown model size '{size}'; use one of table 8's names "
                           f"({', '.join(TABLE8)}), a HF config, or layers=L,hidden=H,vocab=V")
    layers, hidden, heads, vocab, positions, _ = TABLE8[match]
    return glm_shape(match, layers, hidden, heads, vocab, positions)


# ---------------------------------------------------------------------------------------- explicit
_SPEC_KEYS = {"layers", "hidden", "vocab", "heads", "ffn", "positions"}
_DECODER_KEYS = {"kv_heads", "gated", "tied"}  #: any of these makes the spec a Llama-shaped decoder


def spec_shape(spec: str) -> ModelShape:
    """``"layers=24,hidden=1024,vocab=30592[,heads=16,ffn=4096,positions=512]"`` -> GLM-shaped;
    with ``kv_heads=``, ``gated=0/1`` or ``tied=0/1`` a Llama-shaped decoder (RMSNorm, rotary
    positions, gated MLP unless ``gated=0``, untied unless ``tied=1``)."""
    values = {}
    for part in spec.split(","):
        key, sep, value = part.strip().partition("=")
        flag = key in ("gated", "tied")
        if not sep or key not in _SPEC_KEYS | _DECODER_KEYS or not value.isdigit() \
                or (value not in ("0", "1") if flag else int(value) < 1):
            raise AutoSKDError(f"bad model spec '{spec}': write layers=L,hidden=H,vocab=V with positive "
                               f"integers (optional: heads, ffn, positions; decoders: kv_heads, gated=0/1, tied=0/1)")
        values[key] = int(value)
    missing = {"layers", "hidden", "vocab"} - set(values)
    if missing:
        raise AutoSKDError(f"model spec '{spec}' lacks {', '.join(sorted(missing))}; "
                           "write layers=L,hidden=H,vocab=V")
    hidden = values["hidden"]
    heads = values.get("heads", max(1, hidden // 64))
    if hidden % heads:
        raise AutoSKDError(f"model spec '{spec}': hidden {hidden} is not divisible by heads {heads}")
    if _DECODER_KEYS & set(values):
        from .decoders import llama_shape

        return llama_shape(spec, layers=values["layers"], hidden=hidden, heads=heads,
                           kv_heads=values.get("kv_heads", heads), ffn=values.get("ffn", 4 * hidden),
                           vocab=values["vocab"], positions=values.get("positions", 4096),
                           tied=bool(values.get("tied", 0)), gated=bool(values.get("gated", 1)))
    return glm_shape(spec, values["layers"], hidden, heads, values["vocab"], values.get("positions", 512),
                     values.get("ffn"))


# ---------------------------------------------------------------------------------------- HF config
def _first_int(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return default


def hf_config_shape(source, layers: int | None = None) -> ModelShape:
    """Shape of a Hugging Face model: ``source`` is a config object, a folder, a ``config.json``
    file, a hub id or an alias. The model is built on ``meta`` with ``AutoModel.from_config``,
    or ``AutoModelForCausalLM`` for a decoder LM (its untied output layer holds V x h more
    parameters: 6.5% of Llama-3 8B)."""
    from transformers import AutoConfig, AutoModel, PretrainedConfig

    name = source if isinstance(source, str) else type(source).__name__
    if isinstance(source, PretrainedConfig):
        config = source
    elif isinstance(source, (str, Path)) and Path(source).is_file():
        try:
            data = json.loads(Path(source).read_text())
            config = AutoConfig.for_model(**data)
        except (ValueError, KeyError) as err:
            raise AutoSKDError(f"'{source}' is not a Hugging Face config.json ({err})") from err
    else:
        from ..models.loading import load_config
        config = load_config(str(source))
    config = config.__class__.from_dict(config.to_dict())  # a copy we may cut down
    n_layers = _first_int(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    if layers is not None:
        if n_layers is None or not 1 <= layers <= n_layers:
            raise AutoSKDError(f"cannot keep {layers} layers of '{name}' (it has {n_layers}); "
                               f"pick 1..{n_layers}")
        for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if hasattr(config, attr):
                setattr(config, attr, layers)
        n_layers = layers
    hidden = _first_int(config, "hidden_size", "n_embd", "d_model", "dim")
    if n_layers is None or hidden is None:
        raise AutoSKDError(f"config of '{name}' has no layer count/hidden size the planner understands")
    from .decoders import decoder_details, is_causal_lm

    causal = is_causal_lm(config)
    try:
        if causal:  # the LM head counts too when it is not tied to the embeddings
            from transformers import AutoModelForCausalLM

            module = meta_module(lambda: AutoModelForCausalLM.from_config(config))
        else:
            module = meta_module(lambda: AutoModel.from_config(config))
    except Exception as err:  # an exotic architecture: fall back to the GLM-style formula
        raise AutoSKDError(f"could not build '{name}' on the meta device ({type(err).__name__}: "
                           f"{str(err)[:120]}); describe it as layers=L,hidden=H,vocab=V") from err
    params = sum(p.numel() for p in module.parameters())
    heads = _first_int(config, "num_attention_heads", "n_head", "num_heads", "n_heads", default=max(1, hidden // 64))
    ffn = _first_int(config, "intermediate_size", "n_inner", "ffn_dim", "hidden_dim", default=4 * hidden)
    vocab = _first_int(config, "vocab_size", default=0)
    positions = _first_int(config, "max_position_embeddings", "n_positions", default=512)
    label = name if layers is None else f"{name}[:{layers} layers]"
    extra = decoder_details(config, module) if causal else {}
    return ModelShape(label, n_layers, hidden, heads, ffn, vocab, positions, params, **extra)


_SIZE_RE = re.compile(r"^\d+(\.\d+)?[A-Za-z]$")  # "100B"; "100X" is a typo, not a hub id


def resolve_shape(source, layers: int | None = None) -> ModelShape:
    """Any accepted description -> :class:`ModelShape` (see the module docstring)."""
    if isinstance(source, ModelShape):
        return source
    if isinstance(source, str):
        text = source.strip()
        if not text:
            raise AutoSKDError("empty model description; give a size (100B), a HF config or layers=..,hidden=..,vocab=..")
        if _SIZE_RE.match(text):
            shape = table8_shape(text)
            if layers is not None:
                shape = glm_shape(f"{shape.name}[:{layers} layers]", layers, shape.hidden, shape.heads,
                                  shape.vocab, shape.max_positions)
            return shape
        from .decoders import named_decoder

        named = named_decoder(text, layers=layers)
        if named is not None:
            return named
        if "=" in text and "," in text or text.startswith("layers="):
            return spec_shape(text)
    return hf_config_shape(source, layers=layers)
