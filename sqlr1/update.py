"""The policy update shared by SFT and GRPO: AdamW, the micro-batch loop, the optimizer step.

One optimisation step = forward + backward over the step's micro-batches (gradients accumulate), then one clipped
AdamW step. train.py calls these for both stages; the dry run (sqlr1/dryrun.py) runs the very same functions under
fake tensors to measure their memory at full scale.
"""

from __future__ import annotations

import contextlib
import math

import torch

from sqlr1 import distributed
from sqlr1.batch import MicroBatch, Sequence, collate, split_micro_batches
from sqlr1.config import TrainConfig
from sqlr1.grpo import policy_loss, rollout_mismatch, sft_loss


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float, total_steps: int):
    """AdamW on fp32 master weights, with constant or linear-warmup + cosine learning rate."""
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(model, opt, sched, cfg: TrainConfig, loss_sum: torch.Tensor) -> tuple[float, float, bool]:
    """Clip, check for NaN/inf (then skip the update), step. Returns (grad_norm, the step's loss over all ranks,
    stepped)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    loss = float(distributed.all_reduce(loss_sum.detach().clone()))
    ok = math.isfinite(grad_norm) and math.isfinite(loss)
    if ok:
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm, loss, ok


def compute_context(device: torch.device, compute_dtype: torch.dtype, sharded: bool):
    """bf16 autocast around fp32 master weights in a single process (FSDP's MixedPrecisionPolicy does it when sharded)."""
    if sharded or compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype)


def micro_batch_logprobs(model, mb: MicroBatch, temperature: float, vocab_size: int,
                         with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y_t | q, y_<t) [B, C] of a micro-batch's completion tokens (aligned with mb.mask), and optionally the
    entropy there: the one forward every consumer uses (policy update, reference, old log-probs). A group-shaped
    micro-batch (mb.group set: TrainConfig.shared_prefix) runs each prompt once (Qwen2.shared_prefix_logprobs)."""
    if mb.group is not None:
        return model.shared_prefix_logprobs(mb.input_ids, mb.attention_mask, mb.start, mb.group,
                                            temperature=temperature, with_entropy=with_entropy, vocab_size=vocab_size)
    return model.token_logprobs(mb.input_ids, mb.attention_mask, start=mb.start, temperature=temperature,
                                with_entropy=with_entropy, vocab_size=vocab_size)


def train_on_micro_batches(policy, micro_batches: list[MicroBatch], norm, cfg: TrainConfig, d, ctx, vocab_size: int,
                           sft: bool, old_from_policy: bool = False) -> tuple[torch.Tensor, dict]:
    """Forward + backward over one optimisation step's micro-batches (gradients accumulate in .grad).

    The loss of each micro-batch is its contribution to the step's loss (normalised by counts over the whole step,
    all ranks), so the accumulated gradient does not depend on how the step was split. FSDP averages gradients
    over ranks; multiplying by world_size turns that average back into the sum the objective needs.

    FSDP2 gradient sync (cfg.grad_accum_no_sync), for a model of P parameters on N ranks and K micro-batches:
    False (default): reduce-scatter after every micro-batch; only the sharded fp32 gradient (4P/N bytes) is kept,
    at K reduce-scatters per step. True: `set_requires_gradient_sync(False)` until the last micro-batch, one
    reduce-scatter per step, but every rank holds the full unsharded fp32 gradient (4P bytes: ~28 GiB at 7B).

    old_from_policy (recompute_old_logp at ppo_epochs == 1, as TRL does): log pi_old := this very forward's
    detached log-probs, so rho = 1 exactly with no extra forward; mb.old_logp is overwritten and the
    `rollout_mismatch` sums (vs mb.sampler_logp) are added to the returned metric sums.
    """
    loss_sum, metric_sums = torch.zeros(()), {}
    for i, mb in enumerate(micro_batches):
        if hasattr(policy, "set_requires_gradient_sync"):  # FSDP: no-sync holds unsharded grads until the last one
            policy.set_requires_gradient_sync(not cfg.grad_accum_no_sync or i == len(micro_batches) - 1)
        with ctx:
            logp, entropy = micro_batch_logprobs(policy, mb, 1.0 if sft else cfg.temperature, vocab_size,
                                                 with_entropy=not sft)
        if sft:
            loss, metrics = sft_loss(logp, mb.mask, norm), {}
        else:
            if old_from_policy:
                mb.old_logp = logp.detach()
                _add_mismatch(metric_sums, mb, cfg)
            loss, metrics = policy_loss(logp, mb.old_logp, mb.ref_logp, mb.advantages, mb.mask, cfg.grpo, norm, entropy,
                                        sampler_logp=mb.sampler_logp)
        (loss * d.world_size).backward()
        loss_sum += loss.detach().float().cpu()
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
    return loss_sum, metric_sums


@torch.no_grad()
def recompute_old_logprobs(policy, micro_batches: list[MicroBatch], cfg: TrainConfig, ctx, vocab_size: int) -> dict:
    """log pi_old := the policy's own no-grad forward (`micro_batch_logprobs`, same compute context) at the weights
    that sampled, replacing each mb.old_logp; the sampler's log-probs stay in mb.sampler_logp (as verl does).

    Before the first update the ratio rho = pi_theta / pi_old is then exactly 1: the loss forward repeats this
    forward on the same micro-batches (bit for bit on CPU under bf16 autocast, tested), whereas the rollout
    engine's KV-cached bf16 numbers differ (mean |log rho| 0.007-0.05 per token on tiny models, enough for GSPO's
    clip band to reject most sequences by numerics alone). Costs one no-grad forward of the step's micro-batches
    (benchmarks/bench_old_logp.py); at ppo_epochs == 1 train.py uses `train_on_micro_batches(old_from_policy=True)`.
    Returns `rollout_mismatch` sums (empty when mb.sampler_logp is None).
    """
    sums: dict = {}
    for mb in micro_batches:
        with ctx:
            mb.old_logp = micro_batch_logprobs(policy, mb, cfg.temperature, vocab_size)[0].float()
        _add_mismatch(sums, mb, cfg)
    return sums


def _add_mismatch(sums: dict, mb: MicroBatch, cfg: TrainConfig) -> None:
    """Add this micro-batch's `rollout_mismatch` sums (trainer's log pi_old vs the sampler's) into `sums`."""
    if mb.sampler_logp is not None:
        for k, v in rollout_mismatch(mb.old_logp, mb.sampler_logp, mb.mask, cfg.grpo).items():
            sums[k] = sums.get(k, 0.0) + float(v)


def microbatches(seqs: list[Sequence], micro_batch_size: int, pad_id: int, device,
                 shared: bool = False) -> list[MicroBatch]:
    """Split into the same number of micro-batches on every rank (FSDP needs matching collectives); `shared`:
    group-shaped micro-batches for the shared-prefix forward (batch.py)."""
    n_local = len(split_micro_batches(seqs, micro_batch_size, shared=shared))
    n = int(distributed.all_reduce(torch.tensor(n_local), op="max"))
    chunks = split_micro_batches(seqs, micro_batch_size, n, shared=shared)
    return [collate(chunk, pad_id, device, shared=shared) for chunk in chunks]
