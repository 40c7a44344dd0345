"""Extraction hooks and operation hooks (GKD, section 3.3), without touching model code.

*Extraction hooks* (:class:`FeatureExtractor`) put forward hooks only on the modules that the
requested features need -- ``attention_probs:-1`` hooks the last layer's query and key
``nn.Linear``s and nothing else -- and derive the features after the forward:

- ``embeddings``: hook on the embedding block; its output.
- ``hidden:i``: hook on encoder layer i; its output (the first element of a tuple).
- ``query:i`` / ``key:i`` / ``value:i``: hook on that projection of layer i;
  [B,T,H] -> [B,heads,T,d].
- ``attention_scores:i``: hooks on layer i's query and key; QKᵀ/√d (+ MPNet's relative
  position bias), key positions where ``batch["attention_mask"]`` is 0 set to
  ``finfo(dtype).min``; [B,heads,T,T].
- ``attention_probs:i``: the same hooks; softmax of the scores.
- ``mlm_logits``: hook on the last encoder layer; the model's ``mlm_head`` (BERT's MLM head,
  see :mod:`autoskd.engine.mlm`) on the last hidden, or last hidden @ word_embeddingsᵀ without one;
  [B,T,V], or [N,V] at the positions ``batch["mlm_rows"]`` selects when the batch has it.
- ``logits``: no hook; ``output.logits`` (or the output itself when it is a tensor).
- ``lm_logits``: no hook; a causal LM's ``output.logits``, [B,T,V] (the loss code masks tokens).

On a causal LM (``adapter.causal``) ``embeddings`` is what decoder layer 0 receives, ``hidden:-1``
is before the final norm (``adapter.final_norm``), and the attention features are captured at
the model's attention function (:mod:`.decoder_attention`), not derived from Q/K/V hooks.

Hooks record only while the extractor's ``__call__`` runs, and what they recorded is dropped
when the call returns, so nothing is retained between steps (the returned dict is the only
owner of the features). The autograd graph is kept: student features carry gradients; the
caller wraps a teacher's extraction in ``torch.no_grad()``.

*Operation hooks* change a forward pass for the duration of a ``with`` block:
:func:`replace_forward` (swap a module's forward, e.g. BERT-of-Theseus replacing a teacher
layer by a student layer or skipping a layer), :func:`transform_output` (rewrite a module's
output) and :class:`OperationHooks` (several of them entered and exited together).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..errors import AutoSKDError
from .batches import MODEL_INPUT_KEYS
from ..models.adapters import ArchitectureAdapter, module_at
from .decoder_attention import DecoderAttentionCapture, lm_logits
from .features import ATTENTION_KINDS, FeatureRef, parse_feature

#: Feature kinds read from the model output, needing no hook (nor an adapter).
OUTPUT_KINDS = ("logits", "lm_logits")


def _first_tensor(output: Any) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first element of a tuple/ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("last_hidden_state", "logits"):
            if key in output:
                return output[key]
        return next(iter(output.values()))
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    raise TypeError(f"cannot find a tensor in module output of type {type(output).__name__}")


def model_logits(output: Any) -> torch.Tensor:
    """``output.logits``, or the output itself when the model returns a tensor."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    return _first_tensor(output)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, heads*d] -> [B, heads, T, d]."""
    b, t, h = x.shape
    return x.view(b, t, num_heads, h // num_heads).transpose(1, 2)


def attention_scores(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     position_bias: torch.Tensor | None = None) -> torch.Tensor:
    """QKᵀ/√d (+ bias); key positions where ``attention_mask`` [B,T] is 0 get ``finfo.min``.

    ``query``/``key`` are [B, heads, T, d]; the result is [B, heads, T, T].
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.size(-1))
    if position_bias is not None:
        scores = scores + position_bias.to(scores.dtype)
    if attention_mask is not None:
        masked = (attention_mask == 0)[:, None, None, :].to(scores.device)
        scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
    return scores


class FeatureExtractor:
    """Capture named features of ``model`` with forward hooks on just the modules they need.

    >>> fx = FeatureExtractor(model, ["hidden:-1", "attention_probs:-1"])
    >>> out = fx(batch)   # {"hidden:-1": ..., "attention_probs:-1": ..., "logits": ...}
    >>> fx.set_features(["value:-1"]); fx.remove()
    """

    def __init__(self, model: nn.Module, features: Iterable[str] = (),
                 adapter: ArchitectureAdapter | None = None):
        """``adapter`` defaults to :meth:`ArchitectureAdapter.for_model` (detection); a model
        of unknown architecture still works for ``"logits"`` alone."""
        self.model = model
        self._adapter_error: AutoSKDError | None = None
        if adapter is None:
            try:
                adapter = ArchitectureAdapter.for_model(model)
            except AutoSKDError as err:  # fine while only "logits" is asked for (plain KD)
                self._adapter_error = err
        self.adapter = adapter
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._captured: dict[str, torch.Tensor] = {}
        self._recording = False
        self._requested: dict[str, FeatureRef] = {}
        self._paths: dict[str, str] = {}
        self._attention: DecoderAttentionCapture | None = None
        self._input_keys = self._accepted_input_keys()
        self.set_features(features)

    # ------------------------------------------------------------------ setup
    @property
    def features(self) -> list[str]:
        """The requested feature names, as given."""
        return list(self._requested)

    @property
    def hooked_paths(self) -> list[str]:
        """Module paths that currently carry an extraction hook."""
        return list(self._paths)

    def set_features(self, names: Iterable[str]) -> "FeatureExtractor":
        """Hook the modules needed for ``names`` (removing the previous hooks)."""
        if isinstance(names, str):
            names = [names]
        requested: dict[str, FeatureRef] = {}
        for name in names:
            ref = parse_feature(name)
            if ref.kind == "lm_logits" and self.adapter is not None and not self.adapter.causal:
                raise AutoSKDError(f"lm_logits needs a causal LM; {self.adapter.family} is not one "
                                   "(an encoder's word predictions are mlm_logits)")
            if ref.kind not in OUTPUT_KINDS:
                if self.adapter is None:
                    raise self._adapter_error or AutoSKDError("no architecture adapter")
                ref = ref.resolve(self.adapter.geometry.num_layers)
            requested[str(name)] = ref
        paths: dict[str, str] = {}  # path -> role, insertion-ordered, deduplicated
        for ref in requested.values():
            for role, path in self._needed(ref):
                paths.setdefault(path, role)
        modules = {path: module_at(self.model, path) for path in paths}  # validate first
        self.remove()
        self._requested = requested
        self._paths = paths
        layers = {ref.layer for ref in requested.values() if self._decoder_attention(ref)}
        self._attention = DecoderAttentionCapture.for_layers(self.model, self.adapter, layers)
        for path, module in modules.items():  # attention modules are watched, not hooked
            if paths[path] != "attention":
                self._handles.append(module.register_forward_hook(self._make_hook(path)))
        return self

    def _decoder_attention(self, ref: FeatureRef) -> bool:
        """Whether ``ref`` is an attention feature of a causal LM (captured, not hooked)."""
        return ref.kind in ATTENTION_KINDS and self.adapter is not None and self.adapter.causal

    def _needed(self, ref: FeatureRef) -> list[tuple[str, str]]:
        a = self.adapter
        if ref.kind == "embeddings":
            return [("embeddings", a.path("embeddings"))]
        if ref.kind == "hidden":
            return [("layer", a.path("layer", ref.layer))]
        if self._decoder_attention(ref):
            self._need_heads(ref)
            return [("attention", a.path("attention", ref.layer))]
        if ref.kind in ("query", "key", "value"):
            needed = [(ref.kind, a.path(ref.kind, ref.layer))]
            self._need_heads(ref)
            return needed
        if ref.kind in ("attention_scores", "attention_probs"):
            needed = [("query", a.path("query", ref.layer)), ("key", a.path("key", ref.layer))]
            self._need_heads(ref)
            if a.position_bias is not None:
                needed.append(("position_bias", a.path("position_bias")))
            return needed
        if ref.kind == "mlm_logits":
            a.path("word_embeddings")  # error now if the adapter lacks it
            return [("layer", a.path("layer", a.geometry.num_layers - 1))]
        return []  # logits, lm_logits: from the model output

    def _need_heads(self, ref: FeatureRef) -> None:
        if not self.adapter.geometry.num_heads:
            raise AutoSKDError(f"feature {ref.name!r} needs the number of heads; add \"num_heads\" to paths")

    def _make_hook(self, path: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self._recording:
                tensor = _first_tensor(output)
                gather = getattr(module, "autoskd_gather", None)  # a tensor-parallel shard -> whole feature
                self._captured[path] = gather(tensor) if gather is not None else tensor
        return hook

    def _accepted_input_keys(self) -> tuple[str, ...]:
        accepted = self.adapter.input_keys if self.adapter is not None else MODEL_INPUT_KEYS
        keys = tuple(k for k in MODEL_INPUT_KEYS if k in accepted)
        try:
            params = inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return keys
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return keys
        return tuple(k for k in keys if k in params)

    def remove(self) -> None:
        """Remove every extraction hook and drop anything captured."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._paths = {}
        self._captured = {}
        self._attention = None

    def __enter__(self) -> "FeatureExtractor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __del__(self) -> None:  # best effort: never leave hooks on a model we let go of
        with contextlib.suppress(Exception):
            self.remove()

    # ------------------------------------------------------------------- call
    def model_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The model-input keys of ``batch`` that this model accepts."""
        return {k: batch[k] for k in self._input_keys if k in batch and batch[k] is not None}

    def __call__(self, batch: Mapping[str, Any], sink: Callable[[dict[str, torch.Tensor], torch.Tensor], None]
                 | None = None) -> dict[str, torch.Tensor]:
        """Run the model on ``batch``; return the requested features (keyed as requested)
        and ``"logits"``. ``sink(captured, logits)``, when given, also receives the hooked
        modules' outputs (``{module path: tensor}``), e.g. to keep them for :meth:`derive`."""
        self._captured = {}
        self._recording = True
        attention = self._attention.recording() if self._attention is not None else contextlib.nullcontext()
        try:
            with attention:
                output = self.model(**self.model_inputs(batch))
        finally:
            self._recording = False
        try:
            logits = model_logits(output)
            if sink is not None:
                sink(dict(self._captured), logits)
            result = self._derive(batch, logits)
            result["logits"] = logits
        finally:
            self._captured = {}
            if self._attention is not None:
                self._attention.clear()
        return result

    @property
    def per_token_outputs(self) -> bool:
        """Whether every hooked module's output is per row and per token (embeddings, layers, Q/K/V
        projections), so a row's outputs do not depend on the rest of its batch and :meth:`derive`
        can rebuild the features from them (not MPNet's position bias, nor a causal LM's attention
        capture). A causal LM's hidden states qualify: its rows are right-padded (lm/data.py), so a
        real token attends to real tokens only, at the same positions in any batch."""
        return (self.adapter is not None and self._attention is None
                and all(role in ("embeddings", "layer", "query", "key", "value") for role in self._paths.values()))

    def derive(self, batch: Mapping[str, Any], captured: Mapping[str, torch.Tensor],
               logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """What :meth:`__call__` returns, from module outputs captured earlier (its ``sink``)
        instead of a forward pass: the same derivation (heads, scores, MLM head) on them."""
        missing = [p for p in self._paths if p not in captured]
        if missing:
            raise AutoSKDError(f"derive needs the outputs of {', '.join(missing)}")
        self._captured = dict(captured)
        try:
            result = self._derive(batch, logits)
            result["logits"] = logits
        finally:
            self._captured = {}
        return result

    def _derive(self, batch: Mapping[str, Any], logits: torch.Tensor) -> dict[str, torch.Tensor]:
        a, cap = self.adapter, self._captured
        if a is None:  # only "logits" / "lm_logits" were requested
            return {name: lm_logits(logits) for name, ref in self._requested.items() if ref.kind == "lm_logits"}
        heads = a.geometry.num_heads
        mask = batch.get("attention_mask")
        cache: dict[FeatureRef, torch.Tensor] = {}

        def captured(path: str) -> torch.Tensor:
            if path not in cap:
                raise RuntimeError(
                    f"the hook on {path!r} did not fire during the forward; is the module used "
                    f"by {type(self.model).__name__}.forward?"
                )
            return cap[path]

        def get(ref: FeatureRef) -> torch.Tensor:
            if ref in cache:
                return cache[ref]
            k = ref.kind
            if k == "embeddings":
                t = captured(a.path("embeddings"))
            elif k == "hidden":
                t = captured(a.path("layer", ref.layer))
            elif self._decoder_attention(ref):
                t = self._attention.feature(k, ref.layer, mask)
            elif k in ("query", "key", "value"):
                t = split_heads(captured(a.path(k, ref.layer)), heads)
            elif k == "attention_scores":
                bias = None
                if a.position_bias is not None:  # MPNet: embedding output [T, T, heads]
                    bias = captured(a.path("position_bias")).permute(2, 0, 1).unsqueeze(0)
                t = attention_scores(get(FeatureRef("query", ref.layer)), get(FeatureRef("key", ref.layer)),
                                     mask, bias)
            elif k == "attention_probs":
                t = torch.softmax(get(FeatureRef("attention_scores", ref.layer)), dim=-1)
            elif k == "lm_logits":
                t = lm_logits(logits)
            elif k == "mlm_logits":
                last = captured(a.path("layer", a.geometry.num_layers - 1))
                rows = batch.get("mlm_rows")
                if rows is not None:  # only the positions a loss reads: [N, V] (Method.mlm_rows)
                    last = last[rows.to(last.device)]
                head = getattr(self.model, "mlm_head", None)
                if isinstance(head, nn.Module):  # BERT's real MLM head (autoskd.engine.mlm)
                    t = head(last)
                else:  # no head attached: the tied decoder alone
                    weight = module_at(self.model, a.path("word_embeddings")).weight
                    t = torch.matmul(last, weight.t())
            else:
                raise AutoSKDError(f"feature {ref.name!r} is not extracted by hooks")
            cache[ref] = t
            return t

        try:
            return {name: get(ref) for name, ref in self._requested.items() if ref.kind != "logits"}
        finally:
            # ``get`` refers to itself (the recursion), so it, ``cache`` and ``logits`` form a reference
            # cycle that only Python's cyclic GC frees, often many steps later: with an LM's [B, T, V]
            # logits that is hundreds of MB per step. Cutting the self-reference frees them now.
            get = None  # noqa: F841


# --------------------------------------------------------------------------- operation hooks
@contextlib.contextmanager
def replace_forward(module: nn.Module, fn: Callable[..., Any]) -> Iterator[nn.Module]:
    """Within the block, ``module(...)`` calls ``fn(...)`` (same signature as the module's
    forward) instead of its forward; the original is restored on exit, even on an exception.
    Forward hooks on ``module`` still fire (they wrap whatever forward is in place)."""
    had_instance_forward = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = fn  # instance attribute shadows the class method
    try:
        yield module
    finally:
        if had_instance_forward:
            module.forward = previous
        else:
            module.__dict__.pop("forward", None)


def identity_forward(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
    """A forward that returns its first input: ``replace_forward(layer, identity_forward)``
    skips a layer whose forward returns a plain tensor (transformers 5.x BERT layers)."""
    return hidden_states


@contextlib.contextmanager
def transform_output(module: nn.Module, fn: Callable[[nn.Module, Any, Any], Any]) -> Iterator[nn.Module]:
    """Within the block, ``module``'s output is replaced by ``fn(module, inputs, output)``
    (``None`` keeps it). The hook runs before other forward hooks on the module, so the
    extraction hooks record the transformed output -- what the rest of the model sees."""
    handle = module.register_forward_hook(fn, prepend=True)
    try:
        yield module
    finally:
        handle.remove()


class OperationHooks:
    """Several operation hooks entered and exited together (an ``ExitStack`` wrapper).

    It stores recipes, not live context managers, so the same set can be entered once per
    step::

        ops = OperationHooks().replace_forward(layer3, student_layer.forward)
        ops.transform_output(model.bert.embeddings, lambda m, i, o: o * 0.5)
        with ops:
            out = model(**inputs)
    """

    def __init__(self, hooks: Iterable[Callable[[], contextlib.AbstractContextManager]] = ()):
        self._factories: list[Callable[[], contextlib.AbstractContextManager]] = list(hooks)
        self._stack: contextlib.ExitStack | None = None

    def add(self, factory: Callable[[], contextlib.AbstractContextManager]) -> "OperationHooks":
        """Add a zero-argument callable returning a fresh context manager."""
        self._factories.append(factory)
        return self

    def replace_forward(self, module: nn.Module, fn: Callable[..., Any]) -> "OperationHooks":
        return self.add(lambda: replace_forward(module, fn))

    def transform_output(self, module: nn.Module, fn: Callable[[nn.Module, Any, Any], Any]) -> "OperationHooks":
        return self.add(lambda: transform_output(module, fn))

    def __len__(self) -> int:
        return len(self._factories)

    @property
    def active(self) -> bool:
        return self._stack is not None

    def __enter__(self) -> "OperationHooks":
        if self._stack is not None:
            raise RuntimeError("OperationHooks is already entered")
        stack = contextlib.ExitStack()
        try:
            for factory in self._factories:
                stack.enter_context(factory())
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> bool:
        stack, self._stack = self._stack, None
        return bool(stack.__exit__(*exc)) if stack is not None else False
