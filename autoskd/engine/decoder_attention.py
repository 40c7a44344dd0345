"""Attention features of decoder-only causal LMs, captured at the model's attention function.

Why not hook the Q/K/V projections as for encoders: a decoder's attention does more between
the projections and QKᵀ than a reshape -- rotary position embeddings, Qwen3/Gemma3's
``q_norm``/``k_norm``, grouped key/value heads, Gemma's ``query_pre_attn_scalar`` scaling,
Gemma2's logit soft-capping -- and each family does it in its own code. transformers 5 models
(the Llama family, GPT-2, ...) all hand the finished tensors to one pluggable function,
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``, called as
``fn(module, query, key, value, attention_mask, scaling=..., sliding_window=..., softcap=...)``
with post-RoPE ``query`` [B, heads, T, d] and ``key``/``value`` [B, kv_heads, T, d].

:class:`DecoderAttentionCapture` wraps that entry *only while* an extraction that asks for an
attention feature runs (:meth:`DecoderAttentionCapture.recording`). The wrapper records the
inputs when its ``module`` argument is one of the watched attention modules and then calls the
function that was registered before (for ``"eager"``, which transformers resolves to the
modeling file's own ``eager_attention_forward``, that same function), so the model's outputs
are unchanged and unwatched models in the same process (a teacher, another student) just pass
through. Nothing in model code is replaced.

From the recorded tensors the features are derived independently of the attention
implementation (eager, sdpa, flash give the same features):

- ``query:i`` [B, heads, T, d]; ``key:i`` / ``value:i`` with the kv heads repeated to the
  query head count (as eager attention does), [B, heads, T, d];
- ``attention_scores:i``: ``QKᵀ * scaling`` (the model's own scaling), soft-capped
  ``tanh(s / cap) * cap`` when the model passes ``softcap`` (Gemma2), then positions a query
  may not see set to ``finfo(dtype).min``: later positions (causal), key positions where
  ``batch["attention_mask"]`` is 0 (padding) and, on sliding-window layers (Mistral, Gemma2/3,
  Qwen2 with use_sliding_window), keys at or beyond the window (``kv <= q - window``, as
  transformers' ``sliding_window_overlay``); [B, heads, T, T];
- ``attention_probs:i``: softmax of the scores, in float32 and cast back as eager attention
  does (bf16 models). A query row with no visible key (a left-pad
  position) is all ``finfo.min`` and comes out uniform, as eager attention's additive mask
  gives. Probs are before attention dropout (the model is in eval mode for teachers).

Limitations: models whose attention does not call the interface (GPT-2 with
``reorder_and_upcast_attn=True`` under eager, custom attention code) raise a clear error when
an attention feature is asked for; attention sinks (gpt-oss ``s_aux``) and chunked attention
(Llama 4) are not modelled in the mask.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..errors import AutoSKDError


@dataclass
class AttentionRecord:
    """What one attention module passed to the attention function in one forward."""

    query: torch.Tensor           # [B, heads, Tq, d], post-RoPE (and post q_norm)
    key: torch.Tensor             # [B, kv_heads, Tk, d]
    value: torch.Tensor           # [B, kv_heads, Tk, d]
    scaling: float
    sliding_window: int | None = None
    softcap: float | None = None


# --------------------------------------------------------------------------- the dispatch wrapper
_LOCK = threading.RLock()
#: attention module -> callback receiving its record; only modules of a running extraction.
_WATCHED: dict[nn.Module, Callable[[AttentionRecord], None]] = {}
#: implementation key -> [users, the function it had before (None: model's own eager)].
_INSTALLED: dict[str, list[Any]] = {}


def _interface():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # lazy: encoders never need it
    return ALL_ATTENTION_FUNCTIONS


def _model_eager(module: nn.Module) -> Callable:
    """The ``eager_attention_forward`` the module's forward would fall back to: the one in the
    globals of the (undecorated) forward's modeling file."""
    forward = inspect.unwrap(type(module).forward)
    fn = getattr(forward, "__globals__", {}).get("eager_attention_forward")
    if fn is None:
        raise AutoSKDError(
            f"cannot find the eager attention function of {type(module).__name__} "
            f"({type(module).forward.__module__}); load the model with attn_implementation='sdpa'"
        )
    return fn


def _make_dispatch(impl: str) -> Callable:
    def dispatch(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        sink = _WATCHED.get(module)
        if sink is not None:
            names = ("query", "key", "value")
            q, k, v = (args[n] if n < len(args) else kwargs[name] for n, name in enumerate(names))
            scaling = kwargs.get("scaling")
            sink(AttentionRecord(
                query=q, key=k, value=v,
                scaling=float(scaling) if scaling is not None else q.size(-1) ** -0.5,
                sliding_window=kwargs.get("sliding_window"), softcap=kwargs.get("softcap")))
        previous = _INSTALLED[impl][1]
        original = previous if previous is not None else _model_eager(module)
        return original(module, *args, **kwargs)
    dispatch.autoskd_capture = True  # type: ignore[attr-defined]
    return dispatch


def _install(impl: str) -> None:
    interface = _interface()
    with _LOCK:
        if impl in _INSTALLED:
            _INSTALLED[impl][0] += 1
            return
        if impl != "eager" and impl not in interface:
            raise AutoSKDError(f"attention implementation {impl!r} is not in transformers' AttentionInterface")
        previous = interface.get(impl) if impl in interface else None
        local = interface._local_mapping.get(impl)  # restored as it was on uninstall
        _INSTALLED[impl] = [1, previous, local]
        interface[impl] = _make_dispatch(impl)


def _uninstall(impl: str) -> None:
    interface = _interface()
    with _LOCK:
        entry = _INSTALLED[impl]
        entry[0] -= 1
        if entry[0] > 0:
            return
        del _INSTALLED[impl]
        if entry[2] is not None:
            interface[impl] = entry[2]
        else:
            interface._local_mapping.pop(impl, None)


# --------------------------------------------------------------------------- features
def lm_logits(logits: torch.Tensor) -> torch.Tensor:
    """The ``lm_logits`` feature: a causal LM's ``output.logits``, checked to be [B, T, vocab]."""
    if logits.dim() != 3:
        raise AutoSKDError(f"lm_logits must be [B, T, vocab]; the model returned logits of shape {tuple(logits.shape)}")
    return logits


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, kv_heads, T, d] -> [B, kv_heads*groups, T, d], each kv head repeated ``groups``
    times in a row (query head h reads kv head h // groups, as transformers' ``repeat_kv``)."""
    return x if groups == 1 else torch.repeat_interleave(x, groups, dim=1)


def decoder_visible(attention_mask: torch.Tensor | None, batch: int, q_len: int, k_len: int,
                    sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """Bool [B, 1, Tq, Tk]: True where query position q may attend key position kv. Queries
    are the last ``q_len`` of the ``k_len`` positions (no cache: the same positions)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    kv_pos = torch.arange(k_len, device=device)[None, :]
    visible = kv_pos <= q_pos
    if sliding_window is not None:
        visible = visible & (kv_pos > q_pos - int(sliding_window))
    visible = visible[None, None].expand(batch, 1, q_len, k_len)
    if attention_mask is not None:
        visible = visible & (attention_mask != 0)[:, None, None, -k_len:].to(device)
    return visible


def decoder_scores(record: AttentionRecord, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``QKᵀ * scaling`` (soft-capped when the model does), invisible positions ``finfo.min``."""
    q = record.query
    k = repeat_kv(record.key, q.size(1) // record.key.size(1))
    scores = torch.matmul(q, k.transpose(-1, -2)) * record.scaling
    if record.softcap is not None:
        scores = torch.tanh(scores / record.softcap) * record.softcap
    visible = decoder_visible(attention_mask, q.size(0), q.size(2), k.size(2), record.sliding_window, q.device)
    return scores.masked_fill(~visible, torch.finfo(scores.dtype).min)


class DecoderAttentionCapture:
    """Records the attention-function inputs of chosen layers of one decoder model.

    ``modules`` maps layer index -> attention module (``adapter.module(model, "attention", i)``).
    Use :meth:`recording` around the forward, then :meth:`feature`.
    """

    @classmethod
    def for_layers(cls, model: nn.Module, adapter: Any, layers: Iterable[int]) -> "DecoderAttentionCapture | None":
        """A capture of ``adapter``'s ``attention`` modules at ``layers``; ``None`` for no layer."""
        modules = {layer: adapter.module(model, "attention", layer) for layer in sorted(set(layers))}
        return cls(model, modules) if modules else None

    def __init__(self, model: nn.Module, modules: Mapping[int, nn.Module]):
        self.model = model
        self.modules = dict(modules)
        self.records: dict[int, AttentionRecord] = {}
        self._scores: dict[int, torch.Tensor] = {}  # per layer, shared by scores and probs

    def _implementations(self) -> set[str]:
        impls = set()
        for module in self.modules.values():
            config = getattr(module, "config", None)
            if config is None:
                config = getattr(self.model, "config", None)
            impl = getattr(config, "_attn_implementation", None)
            if impl is None:
                raise AutoSKDError(f"{type(module).__name__} has no config._attn_implementation; "
                                   "decoder attention features need a transformers attention module")
            impls.add(impl)
        return impls

    @contextlib.contextmanager
    def recording(self) -> Iterator["DecoderAttentionCapture"]:
        """Within the block, record what the watched modules pass to the attention function."""
        self.clear()
        if not self.modules:
            yield self
            return
        impls = sorted(self._implementations())
        with _LOCK:
            busy = [m for m in self.modules.values() if m in _WATCHED]
            if busy:
                raise AutoSKDError("this attention module is already being captured by another extraction")
            for layer, module in self.modules.items():
                _WATCHED[module] = self._sink(layer)
        installed: list[str] = []
        try:
            for impl in impls:
                _install(impl)
                installed.append(impl)
            yield self
        finally:
            for impl in installed:
                _uninstall(impl)
            with _LOCK:
                for module in self.modules.values():
                    _WATCHED.pop(module, None)

    def _sink(self, layer: int) -> Callable[[AttentionRecord], None]:
        def record(rec: AttentionRecord) -> None:
            self.records[layer] = rec
        return record

    def clear(self) -> None:
        """Drop what was recorded (nothing is retained between steps)."""
        self.records = {}
        self._scores = {}

    def record(self, layer: int) -> AttentionRecord:
        if layer not in self.records:
            module = self.modules.get(layer)
            raise RuntimeError(
                f"the attention module of layer {layer} ({type(module).__name__}) did not call "
                f"transformers' attention function during the forward (e.g. GPT-2 with "
                f"reorder_and_upcast_attn under eager); its attention features cannot be captured"
            )
        return self.records[layer]

    def feature(self, kind: str, layer: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``kind`` in query/key/value/attention_scores/attention_probs for ``layer``."""
        rec = self.record(layer)
        groups = rec.query.size(1) // rec.key.size(1)
        if kind == "query":
            return rec.query
        if kind == "key":
            return repeat_kv(rec.key, groups)
        if kind == "value":
            return repeat_kv(rec.value, groups)
        if layer not in self._scores:
            self._scores[layer] = decoder_scores(rec, attention_mask)
        scores = self._scores[layer]
        if kind == "attention_scores":
            return scores
        if kind == "attention_probs":
            return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
        raise AutoSKDError(f"{kind!r} is not a decoder attention feature")
