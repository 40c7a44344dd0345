"""The one-step unrolled θ-gradient of AutoSKD's bilevel problem (section 2.4.1, DARTS-style).

AutoSKD solves ``min_θ L_val(w*(θ), θ)`` s.t. ``w*(θ) = argmin_w L_train(w, θ)`` and approximates
``w*(θ)`` by one virtual SGD step ``w' = w − ξ ∇_w L_train(w, θ)``. The gradient it descends is

    d/dθ L_val(w', θ) = ∇_θ L_val(w', θ) − ξ ∇²_{θ,w} L_train(w, θ) · ∇_{w'} L_val(w', θ).

Everything here is functional: the student ``nn.Module`` is evaluated through
``torch.func.functional_call`` with dicts of tensors, so the model is never rebuilt, deep-copied
or modified (its parameters are bitwise unchanged after every call; float buffers that a forward
updates in place, e.g. BatchNorm running statistics, are restored too).

Loss closures have the signature ``loss_fn(params: dict[str, Tensor], theta: Tensor) -> Tensor``
(a scalar) and own their batch; :func:`make_loss_fn` builds one from a model, a batch and a
``loss_from_outputs(outputs, batch, theta)`` function. Closures must be deterministic (put the
model in ``eval()`` mode or fix dropout's RNG): the finite differences compare two evaluations.

How θ enters the distillation losses (used by the engine):

* SSWO: the student distils from the sampled teacher's logits scaled by its weight,
  ``θ_i · z_Ti`` (:func:`sswo_teacher_logits`);
* CR: from the mixture ``Σ_i θ_i z_Ti`` over the active teachers (:func:`cr_teacher_logits`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import AutoSKDError
from ..engine.batches import MODEL_INPUT_KEYS
from ..engine.teachers import theta_logit_scale

__all__ = [
    "LossFn",
    "MODEL_INPUT_KEYS",
    "named_trainable_params",
    "make_loss_fn",
    "unrolled_theta_grad",
    "exact_unrolled_theta_grad",
    "sswo_teacher_logits",
    "cr_teacher_logits",
]

#: ``loss_fn(params, theta) -> scalar``
LossFn = Callable[[dict[str, Tensor], Tensor], Tensor]



# --------------------------------------------------------------------------- helpers
def named_trainable_params(model: nn.Module) -> dict[str, Tensor]:
    """``{name: parameter}`` for the parameters with ``requires_grad`` (the model's own tensors)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _default_model_inputs(batch: Any) -> tuple[tuple, dict]:
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    if isinstance(batch, (tuple, list)):
        return (batch[0],), {}
    raise TypeError(f"cannot tell the model inputs of a batch of type {type(batch).__name__}")


def make_loss_fn(
    model: nn.Module,
    batch: Any,
    loss_from_outputs: Callable[[Any, Any, Tensor], Tensor],
    model_inputs: Callable[[Any], tuple[tuple, dict]] | None = None,
) -> LossFn:
    """A loss closure ``fn(params, theta)`` = ``loss_from_outputs(model_with(params)(inputs), batch, theta)``.

    The model is run with ``torch.func.functional_call(model, params, args, kwargs)``; parameters
    absent from ``params`` (frozen ones) and buffers come from the model itself. By default the
    inputs are: a tensor batch -> ``model(batch)``; a tuple/list ``(x, y, ...)`` -> ``model(x)``; a
    dict batch -> ``model(**{k: batch[k] for k in MODEL_INPUT_KEYS})``. Pass ``model_inputs(batch)
    -> (args, kwargs)`` for anything else.
    """
    split = model_inputs or _default_model_inputs

    def loss_fn(params: dict[str, Tensor], theta: Tensor) -> Tensor:
        args, kwargs = split(batch)
        outputs = functional_call(model, params, tuple(args), dict(kwargs))
        return loss_from_outputs(outputs, batch, theta)

    return loss_fn


@contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Snapshot the model's buffers and copy them back afterwards (a forward in train mode may
    update e.g. BatchNorm running statistics in place)."""
    saved = [(b, b.detach().clone()) for _, b in model.named_buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                if not torch.equal(b, copy):
                    b.copy_(copy)


def _check_args(xi: float, order: str | None = None, fd_eps: float | None = None) -> None:
    if not xi >= 0:
        raise AutoSKDError(f"the virtual-step size xi must be >= 0, got {xi}")
    if order is not None and order not in ("first", "second"):
        raise AutoSKDError(f"unknown unrolled-gradient order {order!r}; choose one of: first, second")
    if fd_eps is not None and not fd_eps > 0:
        raise AutoSKDError(f"the finite-difference step fd_eps must be > 0, got {fd_eps}")


def _grads(out: Tensor, inputs: Sequence[Tensor], **kw) -> list[Tensor]:
    """``torch.autograd.grad`` with zeros for inputs the output does not depend on."""
    if not out.requires_grad:  # nothing depends on the inputs at all
        return [torch.zeros_like(x) for x in inputs]
    gs = torch.autograd.grad(out, list(inputs), allow_unused=True, **kw)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]


def _scalar(loss: Tensor, what: str) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"{what} must return a scalar tensor")
    return loss.reshape(())


def _leaves(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fresh leaf tensors sharing storage with ``params`` (no copy; never written to)."""
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


# --------------------------------------------------------------------------- unrolled gradients
def unrolled_theta_grad(
    model: nn.Module,
    theta: Tensor,
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    xi: float,
    order: Literal["first", "second"] = "second",
    fd_eps: float = 0.01,
    reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> Tensor:
    """The θ-gradient of ``L_val(w − ξ ∇_w L_train(w, θ), θ)`` (detached, θ's shape).

    * Virtual step: ``w' = w − ξ ∇_w L_train(w, θ)`` over :func:`named_trainable_params`, built as a
      new dict of tensors (the model is not touched).
    * ``order="first"``: ``∇_θ L_val(w', θ)`` with ``w'`` held constant (DARTS first order with the
      virtual step; ``xi=0`` gives plain first-order DARTS, ``∇_θ L_val(w, θ)``, computed from one
      student forward on the val batch without a graph through ``w``: the train loss is not evaluated).
    * ``order="second"``: DARTS's finite-difference Hessian-vector product. With
      ``g = ∇_θ L_val(w', θ)``, ``v = ∇_{w'} L_val(w', θ)``, ``ε = fd_eps / ‖v‖`` and
      ``w± = w ± ε v``, returns ``g − ξ (∇_θ L_train(w+, θ) − ∇_θ L_train(w−, θ)) / (2ε)``
      (error O(ε²)). Costs two forward/backward passes more than first order.

    ``theta`` may be a parameter with ``requires_grad``; its ``.grad`` and the model's ``.grad`` are
    not touched (only ``torch.autograd.grad`` is used).

    ``reduce`` averages tensors over data-parallel ranks, each of which evaluates
    ``train_loss_fn`` on its own slice of the batch (the val batch is the same everywhere): it is
    applied to ``∇_w L_train`` (so ``w'`` is the whole batch's virtual step) and to the result (the
    Hessian-vector product is linear in the train batch), giving every rank the one-process value.
    """
    _check_args(xi, order, fd_eps)
    params = named_trainable_params(model)
    names = list(params)
    done = (lambda g: reduce([g.detach()])[0]) if reduce is not None else (lambda g: g.detach())
    if order == "first" and xi == 0:
        # no virtual step: w' = w, and θ reaches L_val only through the targets, so the student's
        # forward needs no graph and the train loss is never evaluated (a forward, not 1.3 steps)
        fixed = {k: p.detach() for k, p in params.items()}
        theta_v = theta.detach().clone().requires_grad_(True)
        with _buffers_restored(model):
            return done(_grads(_scalar(val_loss_fn(fixed, theta_v), "val_loss_fn"), [theta_v])[0])
    with _buffers_restored(model):
        theta_c = theta.detach()
        # virtual step w' = w - xi * grad_w L_train(w, theta)
        w = _leaves(params)
        loss_tr = _scalar(train_loss_fn(w, theta_c), "train_loss_fn")
        gw = _grads(loss_tr, [w[k] for k in names])
        del loss_tr
        if reduce is not None:
            gw = reduce(gw)
        w_prime = {k: (params[k].detach() - xi * g).requires_grad_(True) for k, g in zip(names, gw)}
        del gw, w

        theta_v = theta.detach().clone().requires_grad_(True)
        loss_val = _scalar(val_loss_fn(w_prime, theta_v), "val_loss_fn")
        if order == "first":
            return done(_grads(loss_val, [theta_v])[0])
        g_theta, *v = _grads(loss_val, [theta_v] + [w_prime[k] for k in names])
        del loss_val, w_prime
        if xi == 0:
            return done(g_theta)
        norm = torch.sqrt(sum((vi.double() ** 2).sum() for vi in v)) if v else torch.zeros((), dtype=torch.float64)
        if not torch.isfinite(norm) or float(norm) == 0.0:
            return done(g_theta)  # the val loss is flat in w: no second-order term
        eps = fd_eps / float(norm)

        def theta_grad_of_train_at(sign: float) -> Tensor:
            w_pm = {k: params[k].detach() + (sign * eps) * vi for k, vi in zip(names, v)}
            th = theta.detach().clone().requires_grad_(True)
            loss = _scalar(train_loss_fn(w_pm, th), "train_loss_fn")
            return _grads(loss, [th])[0]

        hvp = (theta_grad_of_train_at(+1.0) - theta_grad_of_train_at(-1.0)) / (2.0 * eps)
        return done(g_theta - xi * hvp)


def exact_unrolled_theta_grad(
    model: nn.Module,
    theta: Tensor,
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    xi: float,
) -> Tensor:
    """The same quantity as :func:`unrolled_theta_grad` (``order="second"``) by autograd through
    the virtual step (``create_graph=True``, an exact Hessian-vector product). Memory grows with
    the double-backward graph: a test oracle and an option for small students."""
    _check_args(xi)
    params = named_trainable_params(model)
    names = list(params)
    with _buffers_restored(model):
        th = theta.detach().clone().requires_grad_(True)
        w = _leaves(params)
        loss_tr = _scalar(train_loss_fn(w, th), "train_loss_fn")
        gw = _grads(loss_tr, [w[k] for k in names], create_graph=True)
        w_prime = {k: w[k] - xi * g for k, g in zip(names, gw)}
        loss_val = _scalar(val_loss_fn(w_prime, th), "val_loss_fn")
        return _grads(loss_val, [th])[0].detach()


# --------------------------------------------------------------------------- how θ enters the losses
def _stack(teacher_logits: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(teacher_logits, Tensor):
        return teacher_logits
    return torch.stack(list(teacher_logits))


def sswo_teacher_logits(teacher_logits: Tensor | Sequence[Tensor], theta: Tensor, i: int,
                        scaling: str = "theta") -> Tensor:
    """SSWO's distillation target: the sampled teacher's logits scaled by its weight, ``θ_i · z_Ti``.

    ``teacher_logits`` is ``[n, B, C]`` (or a list of ``n`` tensors ``[B, C]``; only entry ``i`` is
    used). ``scaling`` picks the factor (:func:`~autoskd.engine.teachers.theta_logit_scale`;
    ``theta`` is the paper's). Differentiable in ``θ_i``; θ is cast to the logits' dtype.
    """
    z = teacher_logits[i]
    return theta_logit_scale(theta, i, scaling).to(z.dtype) * z


def cr_teacher_logits(
    teacher_logits: Tensor | Sequence[Tensor],
    theta: Tensor,
    active: Tensor | None = None,
) -> Tensor:
    """CR's distillation target: the mixture ``Σ_i θ_i z_Ti`` over the active teachers.

    ``teacher_logits`` is ``[n, B, C]`` (or a list of ``n`` tensors); ``active`` an optional bool
    mask ``[n]`` (default: all). Inactive teachers are skipped, not multiplied by 0, so they may be
    absent (e.g. ``None`` in a list) or non-finite. Differentiable in θ.
    """
    n = theta.numel()
    idx = range(n) if active is None else [int(j) for j in torch.nonzero(active.reshape(-1)).flatten().tolist()]
    if not idx:
        raise ValueError("cr_teacher_logits needs at least one active teacher")
    if isinstance(teacher_logits, Tensor):
        sel = torch.as_tensor(list(idx), dtype=torch.long, device=teacher_logits.device)
        z = teacher_logits.index_select(0, sel)
    else:
        z = torch.stack([teacher_logits[j] for j in idx])
    w = theta[torch.as_tensor(list(idx), dtype=torch.long, device=theta.device)].to(device=z.device, dtype=z.dtype)
    return torch.tensordot(w, z, dims=([0], [0]))
