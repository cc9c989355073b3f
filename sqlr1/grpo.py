"""GRPO and friends as pure tensor functions: group advantages, the clipped policy loss, KL, aggregation.

The objective (DeepSeekMath, Shao et al. 2024; SQL-R1 uses it unchanged), for G completions o_i per prompt q:

    A_i      = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)
    rho_i,t  = pi(o_i,t | q, o_i,<t) / pi_old(o_i,t | q, o_i,<t)
    J        = E[ agg_{i,t} ( min(rho_i,t A_i, clip(rho_i,t, 1 - eps_low, 1 + eps_high) A_i) - beta D_KL,t ) ]
    D_KL,t   = pi_ref/pi - log(pi_ref/pi) - 1                 (the k3 estimator, unbiased and >= 0)

Variants selected by `GRPOConfig` (each a published one-line change):
- DAPO (Yu et al. 2025): eps_high > eps_low ("clip-higher"), token-mean aggregation, dropping groups whose rewards
  are all equal (`keep_groups`, the filter form of dynamic sampling).
- Dr.GRPO (Liu et al. 2025): no std division (adv_scale="none") and a constant length normaliser L
  (loss_agg="seq-mean-token-sum-norm"), removing the length and difficulty biases of plain GRPO.
- GSPO (Zheng et al. 2025): one importance ratio per sequence, s_i = exp(mean_t log rho_i,t) (ratio_level="sequence").
- TIS (Yao et al. 2025): the rollout engine's log-probs differ from the trainer's numerically; each token's
  policy-gradient term is weighted by the capped ratio min(pi_old / pi_sampler, C) (`tis_weights`, tis_cap=C).

Aggregation is defined for ONE optimisation step, whatever the micro-batching: `loss_norm` counts the step's
denominators over all micro-batches and ranks first, and `policy_loss` returns each micro-batch's additive share.
Dividing by a per-micro-batch count instead silently reweights tokens whenever lengths differ between micro-batches.

Adding an algorithm: write its function here (tensors in, scalar loss + metric sums out, equation in the docstring),
add a value to the matching `GRPOConfig` switch (checked in `__post_init__`), and branch on it where the existing
variants branch. Nothing outside this module changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

ADV_SCALES = ("group", "batch", "none")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RATIO_LEVELS = ("token", "sequence")


@dataclass
class GRPOConfig:
    """The algorithm's knobs. Defaults: SQL-R1 / DeepSeekMath GRPO with token-mean aggregation.

    std_unbiased=True uses Bessel's correction (torch.std's default, as in the TRL and verl GRPO implementations).
    With G=8 that std is sqrt(8/7) = 1.069x the population std, so advantages are ~6.5% smaller than with False.
    For GSPO use much smaller clip ranges (the paper: eps_low=3e-4, eps_high=4e-4): s_i is a per-token geometric mean.
    """

    adv_scale: str = "group"  # "group": std of the group | "batch": std of the whole batch | "none": Dr.GRPO
    std_unbiased: bool = True
    adv_eps: float = 1e-6
    std_floor: float = 0.0  # std := max(std, std_floor): bounds |A| for nearly constant groups
    clip_low: float = 0.2  # eps_low
    clip_high: float = 0.2  # eps_high (DAPO clip-higher: 0.28)
    max_log_ratio: float = 20.0  # |log rho| and |log(pi_ref/pi)| are clamped to this, for safety
    kl_coef: float = 0.001  # beta; 0 means no reference model is needed
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    ratio_level: str = "token"  # "token" (GRPO/PPO) | "sequence" (GSPO)
    drop_zero_std_groups: bool = False  # DAPO dynamic sampling, filter flavour
    tis_cap: float = 0.0  # truncated importance sampling C (Yao et al. 2025; they use 2): 0 off, else >= 1

    def __post_init__(self) -> None:
        for name, allowed in (("adv_scale", ADV_SCALES), ("loss_agg", LOSS_AGGS), ("ratio_level", RATIO_LEVELS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r}: choose one of {allowed}")
        for name in ("adv_eps", "std_floor", "clip_low", "clip_high", "kl_coef", "entropy_coef"):
            if not 0 <= getattr(self, name) < math.inf:  # NaN fails too
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)} must be finite and >= 0")
        if not (self.tis_cap == 0 or 1 <= self.tis_cap < math.inf):  # NaN fails too
            raise ValueError(f"GRPOConfig.tis_cap={self.tis_cap}: use 0 (off) or a finite cap C >= 1 (e.g. 2); "
                             "C < 1 would down-weight tokens where sampler and trainer agree")
        if not (self.clip_low < 1 and self.max_log_ratio > 0):
            raise ValueError(f"GRPOConfig: need clip_low < 1 and max_log_ratio > 0 (got {self.clip_low}, "
                             f"{self.max_log_ratio})")


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """rewards [N] -> [N/G, G], with a clear error for bad shapes."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards has N={rewards.numel()} entries, not a multiple of group_size={group_size}; "
                         "completions must come in whole groups of G per prompt, group after group")
    return rewards.reshape(-1, group_size)


def group_advantages(
    rewards: Tensor, group_size: int, cfg: GRPOConfig, world_reduce: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, dict]:
    """Outcome advantages A_i, one per completion, for rewards [N] laid out group after group (N = n_prompts * G).

        group: A_i = (r_i - mean_g) / (max(std_g, std_floor) + eps)      (GRPO, SQL-R1)
        batch: A_i = (r_i - mean_g) / (max(std_batch, std_floor) + eps)  (group baseline, batch scale)
        none:  A_i =  r_i - mean_g                                        (Dr.GRPO)

    A singleton group (G=1) has no baseline to compare with: r_i - mean_g = 0, so A_i = 0 (its std, undefined with
    Bessel's correction, is taken as 0). Groups whose rewards are all equal likewise get A = 0 and count in
    `frac_zero_std`. std_batch is over the whole step: with several ranks (each holding whole groups) pass
    world_reduce, an elementwise SUM over ranks as in `loss_norm`. Returns (A [N] fp32, stats of python floats).
    """
    g = _groups(rewards, group_size).float()
    centred = g - g.mean(dim=1, keepdim=True)
    correction = 1 if cfg.std_unbiased else 0
    if cfg.adv_scale == "none":
        adv = centred
    else:
        if cfg.adv_scale == "group":
            std = g.std(dim=1, keepdim=True, correction=correction) if group_size > 1 else g.new_zeros(g.shape[0], 1)
        else:
            std = _step_std(g.reshape(-1), correction, world_reduce or (lambda t: t))
        adv = centred / (std.clamp(min=cfg.std_floor) + cfg.adv_eps)
    zero_std = g.amax(dim=1) == g.amin(dim=1)
    stats = {
        "reward_mean": g.mean().item(),
        "reward_std": g.std(correction=correction).item() if g.numel() > 1 else 0.0,
        "frac_zero_std": zero_std.float().mean().item(),
        "adv_abs_mean": adv.abs().mean().item(),
    }
    return adv.reshape(-1), stats


def _step_std(r: Tensor, correction: int, world_reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """std of all the step's rewards, this rank's r [n] among them: two passes (count and sum for the mean, then
    the squared deviations from it), each one SUM over ranks. 0 when the step has a single reward."""
    count_and_sum = world_reduce(torch.stack([r.new_tensor(float(r.numel())), r.sum()]))
    n, mean = count_and_sum[0], count_and_sum[1] / count_and_sum[0]
    squares = world_reduce((r - mean).square().sum())
    return (squares / (n - correction)).sqrt() if n > 1 else r.new_zeros(())


def keep_groups(rewards: Tensor, group_size: int, cfg: GRPOConfig) -> Tensor:
    """DAPO dynamic sampling (filter form): bool [N], True for completions whose group's rewards are not all equal.

    Such groups have A = 0 for every member, so they only dilute the token average. All True when
    cfg.drop_zero_std_groups is off. Equality is exact (max == min), not std < tolerance.
    """
    g = _groups(rewards, group_size)
    if not cfg.drop_zero_std_groups:
        return torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    return (g.amax(dim=1) > g.amin(dim=1)).repeat_interleave(group_size)


@dataclass
class LossNorm:
    """Denominators of ONE optimisation step, counted before its micro-batch loop over all micro-batches and ranks.

    With these, sum over micro-batches and ranks of `policy_loss(...)[0]` is exactly the full-batch loss. DDP/FSDP
    AVERAGE gradients over ranks, so the trainer multiplies each returned loss by world_size before backward.
    """

    num_tokens: float  # sum of the completion mask over the step
    num_seqs: float  # completions with at least one unmasked token
    max_len: float  # Dr.GRPO's constant L: the configured maximum response length in tokens


def loss_norm(masks: list[Tensor], max_len: int, world_reduce: Callable[[Tensor], Tensor] | None = None) -> LossNorm:
    """Count the step's tokens and sequences from the completion masks [B_k, T_k] of this rank's micro-batches.

    world_reduce, if given, must return the elementwise SUM of a tensor over ranks (e.g. a wrapper around
    torch.distributed.all_reduce). Rows whose mask is all zero (padding rows, dropped groups) are not sequences.
    """
    if not masks:
        raise ValueError("masks is empty: pass the completion masks of every micro-batch of the step")
    if max_len <= 0:
        raise ValueError(f"max_len={max_len} must be the positive maximum response length in tokens")
    device = masks[0].device
    tokens = sum(m.double().sum() for m in masks)
    seqs = sum((m.double().sum(dim=-1) > 0).double().sum() for m in masks)
    counts = torch.stack([tokens.to(device), seqs.to(device)])
    if world_reduce is not None:
        counts = world_reduce(counts)
    num_tokens, num_seqs = counts.tolist()
    if num_tokens <= 0:
        raise ValueError("masks: the step has no completion tokens (all masks are zero); nothing to train on")
    return LossNorm(num_tokens=num_tokens, num_seqs=num_seqs, max_len=float(max_len))


def _check(name: str, x: Tensor | None, shape: torch.Size) -> None:
    if x is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} like logp [B, T]")


def aggregate(per_token: Tensor, mask: Tensor, cfg: GRPOConfig, norm: LossNorm) -> Tensor:
    """This micro-batch's share of the step loss, from finite per-token losses l [B, T] and mask weights m [B, T]:

        token-mean:              sum_{i,t} m l / num_tokens                        (DAPO)
        seq-mean-token-mean:     sum_i (sum_t m l / sum_t m) / num_seqs            (GRPO as in DeepSeekMath)
        seq-mean-token-sum-norm: sum_i (sum_t m l / max_len) / num_seqs            (Dr.GRPO)
    """
    masked = per_token * mask
    if cfg.loss_agg == "token-mean":
        return masked.sum() / norm.num_tokens
    if cfg.loss_agg == "seq-mean-token-mean":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1e-12)).sum() / norm.num_seqs
    return (masked.sum(dim=1) / norm.max_len).sum() / norm.num_seqs


def tis_weights(old_logp: Tensor, sampler_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance-sampling weights (Yao et al. 2025), detached, [B, T]:

        w_t = min(pi_old(o_t) / pi_sampler(o_t), C) = min(exp(log pi_old,t - log pi_sampler,t), C)

    pi_old is the trainer's own forward at the rollout's weights, pi_sampler the rollout engine's (KV-cached, bf16)
    probability of the same token. The completions were drawn from pi_sampler, so w_t corrects the policy gradient
    towards pi_old; the cap C bounds its variance. The log-ratio is clamped to +-20 before exp (masked garbage).
    """
    if cap < 1 or not math.isfinite(cap):
        raise ValueError(f"tis_weights: cap={cap} must be a finite C >= 1")
    _check("sampler_logp", sampler_logp, old_logp.shape)
    return torch.exp((old_logp - sampler_logp).detach().clamp(-20.0, 20.0)).clamp(max=cap)


def rollout_mismatch(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cfg: GRPOConfig) -> dict[str, Tensor]:
    """How far the rollout engine is from the trainer before any update, as SUMS over this micro-batch [B, T]:

        log rho_sampler,t = log pi_old,t - log pi_sampler,t        (0 if both computed the same numbers)
        mismatch_abs_log_rho = sum_t m_t |log rho_sampler,t|
        mismatch_tokens_out  = sum_t m_t [rho_sampler,t outside [1 - eps_low, 1 + eps_high]]
        mismatch_seqs_out    = sum_i [exp(mean_t log rho_sampler,i,t) outside the band]   (GSPO's s_i)

    plus the counts mismatch_tokens and mismatch_seqs. Were pi_sampler used as pi_old, these tokens (sequences for
    ratio_level="sequence") would be clipped by numerics alone. Add over micro-batches and ranks, then
    `finalize_mismatch`.
    """
    _check("sampler_logp", sampler_logp, old_logp.shape)
    _check("mask", mask, old_logp.shape)
    valid = mask != 0
    w = mask.to(torch.float64)
    log_rho = torch.where(valid, old_logp.double() - sampler_logp.double(), 0.0)
    lo, hi = math.log1p(-cfg.clip_low), math.log1p(cfg.clip_high)
    seq_w = w.sum(dim=1)
    seq_log_rho = (w * log_rho).sum(dim=1) / seq_w.clamp(min=1e-12)
    seqs = seq_w > 0
    return {
        "mismatch_tokens": w.sum(),
        "mismatch_seqs": seqs.double().sum(),
        "mismatch_abs_log_rho": (w * log_rho.abs()).sum(),
        "mismatch_tokens_out": (w * ((log_rho < lo) | (log_rho > hi))).sum(),
        "mismatch_seqs_out": (seqs & ((seq_log_rho < lo) | (seq_log_rho > hi))).double().sum(),
    }


def finalize_mismatch(summed: dict) -> dict[str, float]:
    """Sums from `rollout_mismatch` (over micro-batches and ranks) -> mean |log rho_sampler| per token and the
    fractions of tokens and of sequences outside the clip band."""
    tokens, seqs = max(float(summed["mismatch_tokens"]), 1e-12), max(float(summed["mismatch_seqs"]), 1e-12)
    return {"mismatch_abs_log_rho": float(summed["mismatch_abs_log_rho"]) / tokens,
            "mismatch_clip_frac_tokens": float(summed["mismatch_tokens_out"]) / tokens,
            "mismatch_clip_frac_seqs": float(summed["mismatch_seqs_out"]) / seqs}


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    cfg: GRPOConfig,
    norm: LossNorm,
    entropy: Tensor | None = None,
    sampler_logp: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Clipped surrogate + k3 KL - entropy bonus, aggregated as this micro-batch's share of the step loss.

    logp (with grad), old_logp (sampling policy), ref_logp, entropy, mask: [B, T]; advantages: [B] or [B, T].
    The mask is the explicit completion mask (1 on every generated token, stop token included); it is never
    derived from token ids, since Qwen's stop token <|im_end|> may equal the pad id. Values at masked positions
    are ignored, even inf/nan.

        l_t = -w_t min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta k3_t - c_H H_t
        k3_t = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1

    w_t = 1, or with cfg.tis_cap = C > 0 the truncated importance weight min(exp(old_logp - sampler_logp), C) of
    `tis_weights` (sampler_logp [B, T] is then required): it multiplies the policy-gradient term only.

    ratio_level="token": rho_t = exp(clamp(logp_t - old_logp_t, +-max_log_ratio)).
    ratio_level="sequence" (GSPO-token): rho_t = sg[s_i] * pi_t / sg[pi_t], s_i = exp(mean_t log(pi_t/pi_old,t)):
    its value is s_i for every token and d rho_t / d logp_t = s_i, i.e. the token-level gradient with rho_t
    replaced by s_i. With loss_agg="seq-mean-token-mean" and A per sequence this equals GSPO's sequence objective
    min(s_i A_i, clip(s_i) A_i) averaged over sequences, in value and gradient; clipping zeroes whole sequences.

    Returns (loss, metrics): metrics are 0-d detached tensors holding SUMS over this micro-batch (mask-weighted
    counts and values, plus "tokens" and "seqs"); add them over micro-batches and ranks, then `finalize_metrics`.
    """
    shape = logp.shape
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(shape)}")
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask), ("entropy", entropy),
                    ("sampler_logp", sampler_logp)):
        _check(name, x, shape)
    if advantages.shape == shape[:1]:
        advantages = advantages[:, None]
    elif advantages.shape != shape:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected [B]={shape[0]} or {tuple(shape)}")
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError("ref_logp is None but GRPOConfig.kl_coef > 0: pass reference log-probs or set kl_coef=0")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError("entropy is None but GRPOConfig.entropy_coef > 0: use token_logprobs(with_entropy=True)")
    if cfg.tis_cap > 0 and sampler_logp is None:
        raise ValueError("sampler_logp is None but GRPOConfig.tis_cap > 0: pass the rollout engine's log-probs")

    valid = mask != 0
    w = mask.to(logp.dtype)
    log_ratio = torch.where(valid, logp - old_logp.detach(), 0.0).clamp(-cfg.max_log_ratio, cfg.max_log_ratio)
    if cfg.ratio_level == "sequence":
        seq_log_ratio = (w * log_ratio).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1e-12)
        lp = torch.where(valid, logp, 0.0)
        ratio = torch.exp(seq_log_ratio.detach() + lp - lp.detach())
    else:
        ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)

    metrics = {"tokens": w.sum(), "seqs": (w.sum(dim=1) > 0).to(w.dtype).sum()}
    if cfg.tis_cap > 0:
        tis = torch.where(valid, tis_weights(old_logp, sampler_logp, cfg.tis_cap), 0.0)
        per_token = per_token * tis
        metrics["tis_weight_sum"] = (w * tis).sum()
    if ref_logp is not None:
        delta = torch.where(valid, ref_logp.detach() - logp, 0.0).clamp(-cfg.max_log_ratio, cfg.max_log_ratio)
        k3 = torch.exp(delta) - delta - 1
        if cfg.kl_coef > 0:
            per_token = per_token + cfg.kl_coef * k3
        metrics["kl_ref_sum"] = (w * k3).sum()
    if entropy is not None:
        ent = torch.where(valid, entropy, 0.0)
        if cfg.entropy_coef > 0:
            per_token = per_token - cfg.entropy_coef * ent
        metrics["entropy_sum"] = (w * ent).sum()
    loss = aggregate(per_token, w, cfg, norm)

    metrics["clip_low_sum"] = (w * ((ratio < 1 - cfg.clip_low) & (advantages < 0))).sum()
    metrics["clip_high_sum"] = (w * ((ratio > 1 + cfg.clip_high) & (advantages > 0))).sum()
    metrics["ratio_sum"] = (w * ratio).sum()
    metrics["kl_old_sum"] = (w * 0.5 * log_ratio**2).sum()  # k2 estimate of KL(pi_old || pi)
    return loss, {k: v.detach() for k, v in metrics.items()}


def finalize_metrics(summed: dict) -> dict[str, float]:
    """Turn metric sums (added over micro-batches and ranks) into token means.

    Keys: clip_low / clip_high (fraction of tokens clipped on the active side), ratio (mean rho), kl_old (k2 estimate
    of KL(pi_old || pi)), kl_ref (k3 vs the reference; only if ref_logp was given), entropy (true H_t; only if given),
    plus the totals tokens and seqs.
    """
    tokens = float(summed["tokens"])
    out = {"tokens": tokens, "seqs": float(summed["seqs"])}
    for key, value in summed.items():
        if key.endswith("_sum"):
            out[key.removesuffix("_sum")] = float(value) / max(tokens, 1e-12)
    return out


def sft_loss(logp: Tensor, mask: Tensor, norm: LossNorm) -> Tensor:
    """Cold-start SFT share of the step loss: -sum_{i,t} m log pi(y_t) / num_tokens (same normalisation as RL)."""
    _check("mask", mask, logp.shape)
    return -torch.where(mask != 0, logp * mask.to(logp.dtype), 0.0).sum() / norm.num_tokens
