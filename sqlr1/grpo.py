"""GRPO as pure tensor functions: group-relative advantages and the clipped objective with its KL penalty.

For G completions o_i of a prompt q (DeepSeekMath, Shao et al. 2024; SQL-R1 uses it unchanged):

    A_i     = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)
    rho_i,t = pi(o_i,t | q, o_i,<t) / pi_old(o_i,t | q, o_i,<t)
    J       = 1/N sum_i,t [ min(rho_i,t A_i, clip(rho_i,t, 1 - eps_low, 1 + eps_high) A_i) - beta k3_i,t ]
    k3_i,t  = pi_ref/pi - log(pi_ref/pi) - 1                      (the KL estimator: unbiased, >= 0)

N counts the completion tokens of the whole optimisation step, over every micro-batch and rank (`loss_norm`), so a
micro-batch's `policy_loss` is its additive share of J whatever the split. `policy_loss` is that reference; every
variant is a small function behind one `GRPOConfig` switch: Dr.GRPO's unscaled advantages and constant normaliser
(adv_scale, loss_agg), DAPO's clip-higher (clip_high) and group filter (`train_rows`), GSPO's sequence ratio
(`sequence_ratio`), CISPO's clipped-weight REINFORCE (`cispo_term`), truncated importance sampling (`tis_weights`)
and the entropy bonus (`entropy_bonus`).
A new algorithm is a new function here and a switch: nothing outside this module changes.
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
PG_TERMS = ("clip", "cispo")
Reduce = Callable[[Tensor], Tensor]  # an elementwise SUM over ranks (identity in one process)


@dataclass
class GRPOConfig:
    """The algorithm's knobs. Defaults: SQL-R1 / DeepSeekMath GRPO with token-mean aggregation.

    std_unbiased: Bessel's correction, as torch.std, TRL and verl (with G = 8 advantages ~6.5 % smaller than the
    population std's). For GSPO use much smaller clip ranges (the paper: 3e-4 / 4e-4): s_i is a geometric mean.
    """

    adv_scale: str = "group"  # "group": std of the group | "batch": std of the whole step | "none": Dr.GRPO
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
    pg_term: str = "clip"  # the policy-gradient term: "clip" (PPO's clipped surrogate) | "cispo" (MiniMax-M1)
    drop_zero_std_groups: bool = False  # DAPO dynamic sampling, filter flavour
    tis_cap: float = 0.0  # truncated importance sampling C (Yao et al. 2025; they use 2): 0 off, else >= 1

    def __post_init__(self) -> None:
        for name, allowed in (("adv_scale", ADV_SCALES), ("loss_agg", LOSS_AGGS), ("ratio_level", RATIO_LEVELS),
                              ("pg_term", PG_TERMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r}: choose one of {allowed}")
        for name in ("adv_eps", "std_floor", "clip_low", "clip_high", "kl_coef", "entropy_coef"):
            if not 0 <= getattr(self, name) < math.inf:  # NaN fails too
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)} must be finite and >= 0")
        if not (self.tis_cap == 0 or 1 <= self.tis_cap < math.inf):
            raise ValueError(f"GRPOConfig.tis_cap={self.tis_cap}: use 0 (off) or a finite cap C >= 1 (e.g. 2); "
                             "C < 1 would down-weight tokens where sampler and trainer agree")
        if not (self.clip_low < 1 and self.max_log_ratio > 0):
            raise ValueError(f"GRPOConfig: need clip_low < 1 and max_log_ratio > 0 (got {self.clip_low}, "
                             f"{self.max_log_ratio})")


@dataclass
class LossInputs:
    """What the objective reads of one micro-batch: per-token tensors [B, T] (advantages [B] or [B, T]).

    mask is the explicit completion mask (1 on every token that counts, 0 on padding and observations), never
    derived from token ids: Qwen's stop token may equal the pad id. Values at masked positions are ignored."""

    logp: Tensor  # log pi_theta, with grad
    old_logp: Tensor  # log pi_old
    advantages: Tensor
    mask: Tensor
    ref_logp: Tensor | None = None  # log pi_ref (beta > 0)
    entropy: Tensor | None = None  # H_t of pi_theta
    sampler_logp: Tensor | None = None  # the rollout engine's log-probs of the same tokens


@dataclass
class LossNorm:
    """Denominators of ONE optimisation step, counted over all its micro-batches and ranks before the first."""

    num_tokens: float  # sum of the completion mask over the step
    num_seqs: float  # completions with at least one unmasked token
    max_len: float  # Dr.GRPO's constant L: the configured maximum response length in tokens


# ------------------------------------------------------------------------------------------------- advantages


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """rewards [N] -> [N/G, G], with a clear error for bad shapes."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards has N={rewards.numel()} entries, not a multiple of group_size={group_size}; "
                         "completions must come in whole groups of G per prompt, group after group")
    return rewards.reshape(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, cfg: GRPOConfig,
                     world_reduce: Reduce | None = None) -> tuple[Tensor, dict]:
    """A_i for rewards [N] laid out group after group (N = prompts x G); returns (A [N] fp32, stats):

        group: A_i = (r_i - mean_g) / (max(std_g, std_floor) + eps)      (GRPO, SQL-R1)
        batch: A_i = (r_i - mean_g) / (max(std_step, std_floor) + eps)   (std over the step: pass world_reduce)
        none:  A_i =  r_i - mean_g                                         (Dr.GRPO)

    A group whose rewards are all equal (or a singleton) gets A = 0 and counts in `frac_zero_std`."""
    g = _groups(rewards, group_size).float()
    centred = g - g.mean(dim=1, keepdim=True)
    correction = 1 if cfg.std_unbiased else 0
    adv = centred
    if cfg.adv_scale == "group":
        std = g.std(dim=1, keepdim=True, correction=correction) if group_size > 1 else g.new_zeros(g.shape[0], 1)
        adv = centred / (std.clamp(min=cfg.std_floor) + cfg.adv_eps)
    elif cfg.adv_scale == "batch":
        std = _step_std(g.reshape(-1), correction, world_reduce or (lambda t: t))
        adv = centred / (std.clamp(min=cfg.std_floor) + cfg.adv_eps)
    stats = {"frac_zero_std": (g.amax(dim=1) == g.amin(dim=1)).float().mean().item(),
             "adv_abs_mean": adv.abs().mean().item()}
    return adv.reshape(-1), stats


def _step_std(r: Tensor, correction: int, world_reduce: Reduce) -> Tensor:
    """std of all the step's rewards (this rank's r [n] among them), two SUMs over ranks; 0 for a single reward."""
    count_and_sum = world_reduce(torch.stack([r.new_tensor(float(r.numel())), r.sum()]))
    n, mean = count_and_sum[0], count_and_sum[1] / count_and_sum[0]
    squares = world_reduce((r - mean).square().sum())
    return (squares / (n - correction)).sqrt() if n > 1 else r.new_zeros(())


def train_rows(rewards: Tensor, group_size: int, cfg: GRPOConfig,
               world_reduce: Reduce | None = None) -> tuple[list[int], list[float]]:
    """The completions a step trains on, with their weights: all of them at 1 (GRPO), or with DAPO's dynamic sampling
    (filter form, drop_zero_std_groups) those whose group's rewards differ (the others have A = 0 and only dilute
    the token mean). Over ranks (world_reduce): a rank left with none keeps one completion at weight 0, so its
    collectives match the others'; when no rank has any, the step trains nothing: ([], [])."""
    if not cfg.drop_zero_std_groups:
        return list(range(rewards.numel())), [1.0] * rewards.numel()
    g = _groups(rewards, group_size)
    keep = (g.amax(dim=1) > g.amin(dim=1)).repeat_interleave(group_size).nonzero().flatten().tolist()
    if int((world_reduce or (lambda t: t))(torch.tensor(len(keep)))) == 0:  # the same answer on every rank
        return [], []
    return (keep, [1.0] * len(keep)) if keep else ([0], [0.0])


# ------------------------------------------------------------------------------------------------- the loss


def loss_norm(masks: list[Tensor], max_len: int, world_reduce: Reduce | None = None) -> LossNorm:
    """Count the step's tokens and sequences from the completion masks [B_k, T_k] of this rank's micro-batches and,
    with world_reduce (an elementwise SUM over ranks), of every rank's. All-zero rows (padding, fillers) are not
    sequences."""
    if not masks:
        raise ValueError("masks is empty: pass the completion masks of every micro-batch of the step")
    if max_len <= 0:
        raise ValueError(f"max_len={max_len} must be the positive maximum response length in tokens")
    tokens = sum(m.double().sum() for m in masks)
    seqs = sum((m.double().sum(dim=-1) > 0).double().sum() for m in masks)
    counts = torch.stack([tokens.to(masks[0].device), seqs.to(masks[0].device)])
    num_tokens, num_seqs = (world_reduce(counts) if world_reduce is not None else counts).tolist()
    if num_tokens <= 0:
        raise ValueError("masks: the step has no completion tokens (all masks are zero); nothing to train on")
    return LossNorm(num_tokens=num_tokens, num_seqs=num_seqs, max_len=float(max_len))


def aggregate(per_token: Tensor, mask: Tensor, cfg: GRPOConfig, norm: LossNorm) -> Tensor:
    """This micro-batch's share of the step's mean of per-token losses l [B, T] under mask weights m [B, T]:

        token-mean:              sum_{i,t} m l / num_tokens                        (DAPO, SQL-R1's recipe)
        seq-mean-token-mean:     sum_i (sum_t m l / sum_t m) / num_seqs            (GRPO as in DeepSeekMath)
        seq-mean-token-sum-norm: sum_i (sum_t m l / max_len) / num_seqs            (Dr.GRPO)
    """
    masked = per_token * mask
    if cfg.loss_agg == "token-mean":
        return masked.sum() / norm.num_tokens
    if cfg.loss_agg == "seq-mean-token-mean":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1e-12)).sum() / norm.num_seqs
    return (masked.sum(dim=1) / norm.max_len).sum() / norm.num_seqs


def policy_loss(x: LossInputs, cfg: GRPOConfig, norm: LossNorm) -> tuple[Tensor, dict]:
    """This micro-batch's share of -J (module docstring), and metric sums (`finalize_metrics`):

        l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta k3_t,   aggregated by `aggregate`
    """
    _check(x, cfg)
    w = x.mask.to(x.logp.dtype)
    log_ratio = torch.where(w != 0, x.logp - x.old_logp.detach(), 0.0).clamp(-cfg.max_log_ratio, cfg.max_log_ratio)
    ratio = sequence_ratio(x, log_ratio) if cfg.ratio_level == "sequence" else torch.exp(log_ratio)
    adv = x.advantages[:, None] if x.advantages.dim() == 1 else x.advantages
    if cfg.pg_term == "cispo":
        per_token = cispo_term(x, ratio, adv, cfg)
    else:
        per_token = -torch.min(ratio * adv, ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * adv)
    metrics = {"tokens": w.sum(), "seqs": (w.sum(dim=1) > 0).to(w.dtype).sum()}
    if cfg.tis_cap > 0:
        tis = torch.where(w != 0, tis_weights(x.old_logp, x.sampler_logp, cfg.tis_cap), 0.0)
        per_token = per_token * tis
        metrics["tis_weight_sum"] = (w * tis).sum()
    if x.ref_logp is not None:
        delta = torch.where(w != 0, x.ref_logp.detach() - x.logp, 0.0).clamp(-cfg.max_log_ratio, cfg.max_log_ratio)
        k3 = torch.exp(delta) - delta - 1
        per_token = per_token + cfg.kl_coef * k3 if cfg.kl_coef > 0 else per_token
        metrics["kl_ref_sum"] = (w * k3).sum()
    if x.entropy is not None:
        bonus = entropy_bonus(x)
        per_token = per_token - cfg.entropy_coef * bonus if cfg.entropy_coef > 0 else per_token
        metrics["entropy_sum"] = (w * bonus).sum()
    metrics.update(clip_low_sum=(w * ((ratio < 1 - cfg.clip_low) & (adv < 0))).sum(),
                   clip_high_sum=(w * ((ratio > 1 + cfg.clip_high) & (adv > 0))).sum(),
                   ratio_sum=(w * ratio).sum(), kl_old_sum=(w * 0.5 * log_ratio**2).sum())  # k2 of KL(pi_old||pi)
    return aggregate(per_token, w, cfg, norm), {k: v.detach() for k, v in metrics.items()}


# -------------------------------------------------------------------------------------------------- variants


def sequence_ratio(x: LossInputs, log_ratio: Tensor) -> Tensor:
    """GSPO (Zheng et al. 2025), ratio_level="sequence": rho_t = sg[s_i] pi_t / sg[pi_t], s_i = exp(mean_t log rho_t).
    Its value is s_i at every token and d rho_t / d log pi_t = s_i: with seq-mean-token-mean aggregation and one A
    per sequence, GSPO's objective min(s_i A_i, clip(s_i) A_i) over sequences, in value and gradient."""
    w = x.mask.to(log_ratio.dtype)
    seq_log_ratio = (w * log_ratio).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1e-12)
    logp = torch.where(w != 0, x.logp, 0.0)
    return torch.exp(seq_log_ratio.detach() + logp - logp.detach())


def cispo_term(x: LossInputs, ratio: Tensor, adv: Tensor, cfg: GRPOConfig) -> Tensor:
    """CISPO (MiniMax-M1, arXiv 2506.13585), pg_term="cispo": REINFORCE weighted by the clipped importance weight,
    stop-gradient, l_t = -sg(min(rho_t, 1 + eps_high)) A log pi_t (no lower bound, as the paper sets it). Where the
    clipped surrogate gives a token outside the band no gradient, CISPO keeps it at a capped weight; at rho = 1
    (the first pass on-policy) the two gradients are the same."""
    return -(ratio.detach().clamp(max=1 + cfg.clip_high) * adv * torch.where(x.mask != 0, x.logp, 0.0))


def tis_weights(old_logp: Tensor, sampler_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (Yao et al. 2025), tis_cap = C: the policy-gradient term of token t is weighted
    by w_t = min(pi_old(o_t) / pi_sampler(o_t), C), detached: the completions were drawn by the rollout engine
    (KV-cached, bf16), whose probabilities differ numerically from the trainer's pi_old."""
    if cap < 1 or not math.isfinite(cap):
        raise ValueError(f"tis_weights: cap={cap} must be a finite C >= 1")
    _same_shape("sampler_logp", sampler_logp, old_logp.shape)
    return torch.exp((old_logp - sampler_logp).detach().clamp(-20.0, 20.0)).clamp(max=cap)


def entropy_bonus(x: LossInputs) -> Tensor:
    """The entropy term H_t (entropy_coef c_H: l_t -= c_H H_t), 0 at masked positions."""
    return torch.where(x.mask != 0, x.entropy, 0.0)


# --------------------------------------------------------------------------------------------------- helpers


def _same_shape(name: str, t: Tensor | None, shape: torch.Size) -> None:
    if t is not None and t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like logp [B, T]")


def _check(x: LossInputs, cfg: GRPOConfig) -> None:
    """Shapes and the inputs a switched-on term needs, each a clear error."""
    if x.logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(x.logp.shape)}")
    for name in ("old_logp", "mask", "ref_logp", "entropy", "sampler_logp"):
        _same_shape(name, getattr(x, name), x.logp.shape)
    if x.advantages.shape not in (x.logp.shape[:1], x.logp.shape):
        raise ValueError(f"advantages has shape {tuple(x.advantages.shape)}, expected [B]={x.logp.shape[0]} or "
                         f"{tuple(x.logp.shape)}")
    for needed, name, hint in ((cfg.kl_coef > 0, "ref_logp", "pass reference log-probs or set kl_coef=0"),
                               (cfg.entropy_coef > 0, "entropy", "use token_logprobs(with_entropy=True)"),
                               (cfg.tis_cap > 0, "sampler_logp", "pass the rollout engine's log-probs")):
        if needed and getattr(x, name) is None:
            raise ValueError(f"{name} is None but its term is on in GRPOConfig: {hint}")


def finalize_metrics(summed: dict) -> dict[str, float]:
    """Metric sums (added over micro-batches and ranks) -> token means: clip_low / clip_high (fraction clipped on the
    active side), ratio (mean rho), kl_old (k2 of KL(pi_old || pi)), kl_ref, entropy, tis_weight when computed;
    plus the totals tokens and seqs."""
    tokens = float(summed["tokens"])
    out = {"tokens": tokens, "seqs": float(summed["seqs"])}
    for key, value in summed.items():
        if key.endswith("_sum"):
            out[key.removesuffix("_sum")] = float(value) / max(tokens, 1e-12)
    return out


def rollout_mismatch(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cfg: GRPOConfig) -> dict[str, Tensor]:
    """How far the rollout engine is from the trainer before any update, as sums over a micro-batch [B, T]:
    log rho_s,t = log pi_old,t - log pi_sampler,t; mismatch_abs_log_rho = sum_t m |log rho_s,t|; the tokens (and
    sequences, by GSPO's s_i) outside the clip band, which pi_sampler as pi_old would clip by numerics alone; and the
    counts mismatch_tokens, mismatch_seqs. Add over micro-batches and ranks, then `finalize_mismatch`."""
    _same_shape("sampler_logp", sampler_logp, old_logp.shape)
    _same_shape("mask", mask, old_logp.shape)
    w = mask.to(torch.float64)
    log_rho = torch.where(mask != 0, old_logp.double() - sampler_logp.double(), 0.0)
    lo, hi = math.log1p(-cfg.clip_low), math.log1p(cfg.clip_high)
    seq_w = w.sum(dim=1)
    seq_log_rho = (w * log_rho).sum(dim=1) / seq_w.clamp(min=1e-12)
    seqs = seq_w > 0
    return {"mismatch_tokens": w.sum(), "mismatch_seqs": seqs.double().sum(),
            "mismatch_abs_log_rho": (w * log_rho.abs()).sum(),
            "mismatch_tokens_out": (w * ((log_rho < lo) | (log_rho > hi))).sum(),
            "mismatch_seqs_out": (seqs & ((seq_log_rho < lo) | (seq_log_rho > hi))).double().sum()}


def finalize_mismatch(summed: dict) -> dict[str, float]:
    """Sums from `rollout_mismatch` -> mean |log rho_s| per token, fractions of tokens and sequences out of band."""
    tokens, seqs = max(float(summed["mismatch_tokens"]), 1e-12), max(float(summed["mismatch_seqs"]), 1e-12)
    return {"mismatch_abs_log_rho": float(summed["mismatch_abs_log_rho"]) / tokens,
            "mismatch_clip_frac_tokens": float(summed["mismatch_tokens_out"]) / tokens,
            "mismatch_clip_frac_seqs": float(summed["mismatch_seqs_out"]) / seqs}


def sft_loss(logp: Tensor, mask: Tensor, norm: LossNorm) -> Tensor:
    """Cold-start SFT share of the step loss: -sum_{i,t} m log pi(y_t) / num_tokens (the RL normalisation)."""
    _same_shape("mask", mask, logp.shape)
    return -torch.where(mask != 0, logp * mask.to(logp.dtype), 0.0).sum() / norm.num_tokens
