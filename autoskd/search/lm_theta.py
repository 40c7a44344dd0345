"""The AutoSKD θ step on a team of language models (next-token distributions, not class logits).

:class:`~autoskd.search.theta_step.ThetaStep` is the schedule (θ steps between the student's,
selection, candidates) and the bilevel gradient; what a classifier and an LM differ in is only
how the losses read the teachers, so :class:`LMThetaStep` overrides exactly that:

* a teacher's target for a batch is its next-token distribution at every counted position: the
  top-k cache's rows (ids, log-probs and a tail bucket; the val split's rows are cached too) or,
  for a live teacher (``top_k=0``), its dense logits. Memory for n teachers is n × k × 6 bytes
  per token with the cache, not n × V × 4;
* the student's loss is the token-level soft cross-entropy (forward KL's student gradient;
  :func:`~autoskd.engine.token_losses.soft_cross_entropy`), plus ``(1 − alpha)`` × its own
  next-token cross-entropy when the student trains with the LM loss mixed in;
* SSWO scales the sampled teacher's logits by θ_i: on a cached teacher that tempers the top-k
  distribution (:func:`~autoskd.engine.token_losses.temper_topk`);
* CR's target is the θ-mixture of the teachers' *distributions* (what AvgKD averages for LMs).
  Soft cross-entropy is linear in the target, so CR's loss is ``Σ θ_j CE(p_j, q)`` and no union of
  the teachers' top-k ids is built;
* the ``task`` val objective is the student's next-token cross-entropy on val text: the log of
  the perplexity the search is judged by; ``teacher_mixture`` is the val text's log-likelihood
  under the teachers' θ-mixture (from the cached val rows: a token outside a teacher's top k gets
  its share of the tail).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..engine.batches import model_inputs, output_logits
from ..engine.teachers import theta_logit_scale
from ..engine.token_losses import TopK, soft_cross_entropy
from ..errors import AutoSKDError
from ..lm.cross_tokenizer_loss import uld_hybrid
from ..lm.teachers import LMTeacher, TopKSet, tempered
from .theta_step import ThetaStep, mixture_nll

__all__ = ["LMThetaStep", "next_token_ce", "lm_distillation_loss"]


def next_token_ce(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """The student's mean next-token cross-entropy over the batch's targets (``target_ids``,
    -100 where no token is predicted): the log-perplexity of the batch."""
    targets = batch["target_ids"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).to(logits.device),
                           ignore_index=-100)


def lm_distillation_loss(logits: torch.Tensor, target, batch: dict, alpha: float, temperature: float) -> torch.Tensor:
    """``alpha · τ² · CE_τ(target, student) + (1 − alpha) · next-token CE`` at the counted positions,
    in the soft-CE form :func:`~autoskd.search.theta_step.distillation_loss` explains."""
    mask = batch["target_ids"] != -100
    if isinstance(target, (TopK, torch.Tensor)):
        soft = soft_cross_entropy(logits, target, temperature=temperature, mask=mask)
    else:  # a teacher with its own tokenizer: the distance the student trains with (KL + ULD)
        soft = uld_hybrid(logits, target, temperature=temperature, mask=mask)
    loss = alpha * soft
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * next_token_ce(logits, batch)
    return loss


@contextlib.contextmanager
def _serving(teacher: LMTeacher, tables: dict):
    """The teacher serves ``tables``' rows inside the block, its own afterwards."""
    saved = teacher.tables
    teacher.tables = tables
    try:
        yield teacher
    finally:
        teacher.tables = saved


class LMThetaStep(ThetaStep):
    """ThetaStep for decoder LMs: the same schedule and bilevel gradient, token-level losses."""

    def val_targets(self, val_loader, val_id, cache) -> dict:
        """Each cached teacher's tables of the val split (empty for a live teacher), prepared the
        way the teacher prepares its training split (a teacher with its own tokenizer aligns the
        val text to the student's tokens), then set aside: the teacher keeps serving train rows."""
        out = {}
        for name, teacher in self.policy.teachers.items():
            if not isinstance(teacher, LMTeacher):
                raise AutoSKDError(f"teacher {name!r} is not a language-model teacher; the LM search needs LM teachers")
            with _serving(teacher, teacher.tables):
                teacher.prepare(val_loader, val_id, progress=False)
                out[name] = teacher.tables
        return out

    # ---------------------------------------------------------------- targets
    def _target(self, teacher: LMTeacher, batch: dict, tables: dict | None):
        """One teacher's next-token distribution on ``batch`` at the loss's temperature: cached
        rows (``tables``: the val split's; None: the teacher's own, the train split's), or the
        live teacher's logits."""
        with _serving(teacher, teacher.tables if tables is None else tables):
            part = teacher.features(batch, ["lm_logits"])["lm_logits"]
        return part.at(self.temperature) if hasattr(part, "at") else part

    def _teacher_logits(self, batch: dict, table: dict | None) -> list:
        """Per teacher (θ order), its target on ``batch`` (train: the teacher's own split tables;
        val: ours). Dropped teachers are still read (cheap: cached rows)."""
        return [self._target(t, batch, None if table is None else table[name])
                for name, t in self.policy.teachers.items()]

    def _vocab(self) -> int:
        return max(t.vocab_size() for t in self.policy.teachers.values())

    def _scaled(self, target, scale: torch.Tensor):
        if not isinstance(target, (TopK, torch.Tensor)):
            raise AutoSKDError("SSWO's θ-scaling tempers a teacher that shares the student's tokenizer; a team with "
                               "an own-tokenizer teacher searches with strategy expected or cr and scaling none")
        if isinstance(target, TopK):
            return tempered(TopKSet({target.temperature: target}), scale, self._vocab()).at(target.temperature)
        return tempered(target, scale, self._vocab())

    # ---------------------------------------------------------------- losses
    def _student_loss(self, logits, targets: list, theta: torch.Tensor, batch: dict, i: int | None,
                      scales: torch.Tensor | None) -> torch.Tensor:
        alpha, tau = self.alpha, self.temperature
        active = [j for j in range(len(targets)) if bool(self.dist.active[j])]
        strategy = self.config.strategy
        if strategy == "sswo":
            scale = theta_logit_scale(theta, i, self.config.scaling)
            return lm_distillation_loss(logits, self._scaled(targets[i], scale), batch, alpha, tau)
        if strategy == "cr":  # soft CE is linear in the target: CE(Σ θ_j p_j) = Σ θ_j CE(p_j)
            return sum(theta[j] * lm_distillation_loss(logits, targets[j], batch, alpha, tau) for j in active)
        # expected: Σ θ_j L_j, each L_j at SSWO's scale c_j held constant (1 with scaling none)
        return sum(theta[j] * lm_distillation_loss(logits, targets[j] if scales is None else
                                                   self._scaled(targets[j], scales[j]), batch, alpha, tau)
                   for j in active)

    def _constant_scales(self) -> torch.Tensor | None:
        if self.config.strategy != "expected" or self.config.scaling == "none":
            return None
        theta_now = self.dist.theta.detach()
        return torch.stack([theta_logit_scale(theta_now, j, self.config.scaling) if self.dist.active[j]
                            else theta_now.new_zeros(()) for j in range(len(theta_now))]).float()

    def loss_closures(self, student, batch: dict, val_batch: dict, i: int | None):
        train_t = functools.cache(lambda: self._teacher_logits(batch, None))
        val_t = functools.cache(lambda: self._teacher_logits(val_batch, self.val_tables))
        scales = self._constant_scales()

        def logits_of(params, b):
            return output_logits(functional_call(student, params, args=(), kwargs=model_inputs(b)))

        def train_loss(params, theta):
            return self._student_loss(logits_of(params, batch), train_t(), theta, batch, i, scales)

        def val_loss(params, theta):
            if self.config.val_objective == "teacher_mixture":  # the student is not read
                return mixture_nll(self._token_likelihoods(val_t(), val_batch), theta)
            logits = logits_of(params, val_batch)
            if self.config.val_objective == "task":
                return next_token_ce(logits, val_batch)  # θ reaches it through w' only
            return self._student_loss(logits, val_t(), theta, val_batch, i, scales)

        return train_loss, val_loss

    def _token_likelihoods(self, targets: list, batch: dict) -> torch.Tensor:
        """``[n, N]``: each teacher's probability of the actual next token at the N counted
        positions of ``batch``. From a top-k row: the cached probability when the token is among
        the k, else the tail mass spread evenly over the other V − k tokens (the same spread
        :func:`~autoskd.engine.token_losses.temper_topk` assumes)."""
        tokens = batch["target_ids"]
        counted = tokens != -100
        vocab = self._vocab()
        out = []
        for target in targets:
            if isinstance(target, TopK):
                ids = target.ids.to(tokens.device)
                hit = ids == tokens.clamp_min(0)[..., None]
                p_hit = (target.logprobs.float().exp() * hit).sum(-1)
                p = torch.where(hit.any(-1), p_hit, target.tail / max(1, vocab - target.k))
            elif isinstance(target, torch.Tensor):
                logp = torch.log_softmax(target.float() / self.temperature, -1)
                p = logp.gather(-1, tokens.clamp_min(0)[..., None].to(logp.device))[..., 0].exp()
            else:
                raise AutoSKDError("the teacher_mixture objective mixes next-token probabilities over one vocabulary; "
                                   "a teacher with its own tokenizer cannot join it (use val objective task)")
            out.append(p[counted.to(p.device)])
        return torch.stack(out).double()

    def direct_grads(self, student, val_batch: dict) -> torch.Tensor:
        """Entry j: ∂/∂θ_j of teacher j's own SSWO loss on ``val_batch`` (``center``)."""
        with torch.no_grad():
            logits = output_logits(student(**model_inputs(val_batch)))
        targets = self._teacher_logits(val_batch, self.val_tables)
        theta = self.dist.theta.detach().clone().requires_grad_(True)
        loss = sum(self._student_loss(logits, targets, theta, val_batch, j, None) for j in self.dist.active_indices())
        return torch.autograd.grad(loss, theta)[0]
