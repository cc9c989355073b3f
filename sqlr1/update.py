"""The update of one optimisation step: forward, loss and backward over its micro-batches, then one AdamW step.

What is backpropagated for micro-batch k on rank r, in `accumulate_gradients`:

    world_size * J_k,r       J_k,r = its tokens' share of the step's objective (grpo.policy_loss or grpo.sft_loss)

with the share's denominator N counted over the whole step, every micro-batch and rank, before the first forward
(`grpo.loss_norm`): the sum over k and r is the step's objective however the step is split, and the world_size
factor turns FSDP's gradient average over ranks back into that sum.

pi_old, the policy that sampled, is the trainer's own forward at the rollout's weights (recompute_old_logp: rho = 1
exactly before the update): the first pass's forward, detached, when the batch is used once (ppo_epochs = 1, as
TRL does), else one no-grad forward before the first pass (as verl does); with recompute_old_logp=false it is the
sampler's log-probs. Each phase (reference, old logp, update, optimizer) is announced to `phases`: train.py times
them, the dry run (sqlr1/dryrun.py) measures their memory.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from sqlr1 import distributed
from sqlr1.batch import MicroBatch, TrainSequence, collate, split_micro_batches
from sqlr1.config import TrainConfig
from sqlr1.distributed import Dist, Models
from sqlr1.grpo import LossInputs, finalize_metrics, finalize_mismatch, loss_norm, policy_loss, rollout_mismatch, sft_loss

Phases = Callable[[str], contextlib.AbstractContextManager]


def no_phases(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class Optimizer:
    """AdamW on the fp32 master weights with its learning-rate schedule: one per stage ("sft", "grpo")."""

    stage: str
    adamw: torch.optim.AdamW
    schedule: torch.optim.lr_scheduler.LambdaLR

    @property
    def lr(self) -> float:
        return self.schedule.get_last_lr()[0]


def new_optimizer(model: torch.nn.Module, cfg: TrainConfig, stage: str) -> Optimizer:
    """AdamW at the stage's learning rate, constant or linear warmup + cosine over the stage's optimizer steps."""
    lr, total = (cfg.sft_lr, cfg.sft_steps) if stage == "sft" else (cfg.lr, cfg.grpo_steps * cfg.ppo_epochs)
    adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=cfg.adam_betas,
                              eps=cfg.adam_eps, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))))
        return 1.0

    return Optimizer(stage, adamw, torch.optim.lr_scheduler.LambdaLR(adamw, factor))


def optimizer_step(model: torch.nn.Module, optimizer: Optimizer, cfg: TrainConfig,
                   loss_sum: torch.Tensor) -> tuple[float, float, bool]:
    """Clip the gradient norm; skip the update when it or the loss is NaN/inf; step. Returns (grad_norm, the step's
    loss over all ranks, stepped)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    loss = float(distributed.all_reduce(loss_sum.detach().clone()))
    ok = math.isfinite(grad_norm) and math.isfinite(loss)
    if ok:
        optimizer.adamw.step()
        optimizer.schedule.step()
    optimizer.adamw.zero_grad(set_to_none=True)
    return grad_norm, loss, ok


def logprobs(model, mb: MicroBatch, temperature: float, vocab_size: int,
             with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y_t | q, y_<t) [B, C] of a micro-batch's completion tokens (aligned with mb.mask) and optionally the
    entropy there: the one forward of the policy, the reference and pi_old. A group-shaped micro-batch (mb.group)
    computes each prompt once (Qwen2.shared_prefix_logprobs)."""
    if mb.group is not None:
        return model.shared_prefix_logprobs(mb.input_ids, mb.attention_mask, mb.start, mb.group,
                                            temperature=temperature, with_entropy=with_entropy, vocab_size=vocab_size)
    return model.token_logprobs(mb.input_ids, mb.attention_mask, start=mb.start, temperature=temperature,
                                with_entropy=with_entropy, vocab_size=vocab_size)


def microbatches(seqs: list[TrainSequence], micro_batch_size: int, pad_id: int, device,
                 shared: bool = False) -> list[MicroBatch]:
    """The same number of micro-batches on every rank (FSDP's collectives must match); `shared`: group-shaped."""
    n = len(split_micro_batches(seqs, micro_batch_size, shared=shared))
    n = max(n, int(distributed.all_reduce(torch.tensor(n), op="max")))  # max over ranks (>= this rank's own)
    return [collate(chunk, pad_id, device, shared=shared)
            for chunk in split_micro_batches(seqs, micro_batch_size, n, shared=shared)]


Objective = Callable[[torch.Tensor, torch.Tensor | None, MicroBatch], tuple[torch.Tensor, dict]]


def accumulate_gradients(models: Models, mbs: list[MicroBatch], objective: Objective, temperature: float,
                         with_entropy: bool, vocab_size: int, cfg: TrainConfig, d: Dist) -> tuple[torch.Tensor, dict]:
    """Forward + backward over the step's micro-batches, gradients accumulating in .grad; returns (this rank's loss,
    metric sums). FSDP2 (several ranks, K micro-batches, P parameters): by default every backward reduce-scatters,
    so only the sharded fp32 gradient (4P/N bytes) is held; grad_accum_no_sync syncs only the last one, holding the
    full unsharded fp32 gradient (4P bytes, ~28 GiB at 7B) through the loop."""
    loss_sum, sums = torch.zeros((), device=d.device), {}  # on the device: no host sync per micro-batch
    for i, mb in enumerate(mbs):
        if hasattr(models.policy, "set_requires_gradient_sync"):
            models.policy.set_requires_gradient_sync(not cfg.grad_accum_no_sync or i == len(mbs) - 1)
        with models.autocast:
            logp, entropy = logprobs(models.policy, mb, temperature, vocab_size, with_entropy)
        loss, metrics = objective(logp, entropy, mb)
        (loss * d.world_size).backward()  # FSDP averages gradients over ranks; the objective sums them
        loss_sum += loss.detach().float()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return loss_sum, sums


def sft_update(models: Models, optimizer: Optimizer, seqs: list[TrainSequence], tokenizer, cfg: TrainConfig,
               d: Dist) -> dict:
    """One SFT step: cross-entropy on the completions' unmasked tokens, normalised over the step."""
    mbs = microbatches(seqs, cfg.micro_batch_size, tokenizer.pad_id, d.device)
    norm = loss_norm([mb.mask for mb in mbs], cfg.max_response_len, world_reduce=distributed.all_reduce)
    loss_sum, _ = accumulate_gradients(models, mbs, lambda logp, _, mb: (sft_loss(logp, mb.mask, norm), {}), 1.0,
                                       False, tokenizer.vocab_size, cfg, d)
    grad_norm, loss, ok = optimizer_step(models.policy, optimizer, cfg, loss_sum)
    tokens = float(distributed.all_reduce(torch.tensor(float(sum(mb.num_tokens for mb in mbs)))))
    return {"loss": loss, "grad_norm": grad_norm, "lr": optimizer.lr, "skipped": not ok, "train_tokens": tokens}


def policy_update(models: Models, optimizer: Optimizer, seqs: list[TrainSequence], tokenizer, cfg: TrainConfig,
                  d: Dist, phases: Phases = no_phases) -> dict | None:
    """One GRPO update: the reference's log-probs, pi_old, then ppo_epochs passes of forward + backward with one AdamW
    step each. Returns the policy metrics over all ranks, or None when no rank has a sequence to train on."""
    if not seqs:
        return None
    mbs = microbatches(seqs, cfg.micro_batch_size, tokenizer.pad_id, d.device, shared=cfg.shared_prefix)
    norm = loss_norm([mb.mask for mb in mbs], cfg.max_response_len, world_reduce=distributed.all_reduce)
    V, mismatch = tokenizer.vocab_size, {}
    if models.ref is not None:
        with phases("reference"), torch.no_grad(), models.autocast:
            for mb in mbs:
                mb.ref_logp = logprobs(models.ref, mb, cfg.temperature, V)[0]
    for mb in mbs:  # pi_old: the sampler's log-probs, or None: the first pass's own forward (`grpo_objective`)
        mb.old_logp = None if cfg.recompute_old_logp else mb.sampler_logp
    if cfg.recompute_old_logp and cfg.ppo_epochs > 1:  # several passes: one no-grad forward before the first
        with phases("old logp"):
            old_logprobs(models, mbs, cfg, V, mismatch)
    objective = grpo_objective(cfg, norm, mismatch)
    losses, grad_norms, skipped, sums = [], [], 0, {}
    for _ in range(cfg.ppo_epochs):
        with phases("update"):
            loss_sum, metrics = accumulate_gradients(models, mbs, objective, cfg.temperature, True, V, cfg, d)
        with phases("optimizer"):
            grad_norm, loss, ok = optimizer_step(models.policy, optimizer, cfg, loss_sum)
        losses.append(loss)  # ~0 at ppo_epochs = 1 (rho = 1): watch the reward
        grad_norms.append(grad_norm)
        skipped += not ok
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    tokens = float(distributed.all_reduce(torch.tensor(float(sum(mb.num_tokens for mb in mbs) * cfg.ppo_epochs))))
    return {**finalize_metrics(distributed.reduce_sums(sums)), "loss": sum(losses) / len(losses),
            "grad_norm": sum(grad_norms) / len(grad_norms), "skipped": skipped, "train_tokens": tokens,
            **(finalize_mismatch(distributed.reduce_sums(mismatch)) if mismatch else {})}


def grpo_objective(cfg: TrainConfig, norm, mismatch: dict) -> Objective:
    """The GRPO objective of one micro-batch's forward (`grpo.policy_loss`); a micro-batch without pi_old takes this
    very forward, detached (rho = 1 exactly, no extra forward), and adds its sampler mismatch into `mismatch`."""
    def objective(logp: torch.Tensor, entropy: torch.Tensor | None, mb: MicroBatch) -> tuple[torch.Tensor, dict]:
        if mb.old_logp is None:
            mb.old_logp = logp.detach()
            add_mismatch(mismatch, mb, cfg)
        return policy_loss(LossInputs(logp, mb.old_logp, mb.advantages, mb.mask, mb.ref_logp, entropy,
                                      mb.sampler_logp), cfg.grpo, norm)

    return objective


@torch.no_grad()
def old_logprobs(models: Models, mbs: list[MicroBatch], cfg: TrainConfig, vocab_size: int, mismatch: dict) -> None:
    """pi_old := the policy's own no-grad forward at the rollout's weights, before the first of several passes."""
    for mb in mbs:
        with models.autocast:
            mb.old_logp = logprobs(models.policy, mb, cfg.temperature, vocab_size)[0].float()
        add_mismatch(mismatch, mb, cfg)


def add_mismatch(sums: dict, mb: MicroBatch, cfg: TrainConfig) -> None:
    """Add this micro-batch's `rollout_mismatch` sums (the trainer's log pi_old vs the sampler's) into `sums`."""
    if mb.sampler_logp is not None:
        for k, v in rollout_mismatch(mb.old_logp, mb.sampler_logp, mb.mask, cfg.grpo).items():
            sums[k] = sums.get(k, 0.0) + float(v)
