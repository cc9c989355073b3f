"""A fixed GRPO optimisation step shared by test_train.py and its torchrun worker (dist_split.py)."""

import contextlib
import random

import torch

from sqlr1 import distributed
from sqlr1.batch import TrainSequence
from sqlr1.config import TrainConfig
from sqlr1.distributed import Models
from sqlr1.grpo import GRPOConfig, group_advantages, loss_norm
from sqlr1.model import ModelConfig, Qwen2
from sqlr1.update import accumulate_gradients, grpo_objective, microbatches, new_optimizer, optimizer_step

VOCAB, GROUP, PROMPTS = 61, 4, 4
LOSS_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# (grad_accum_no_sync, shared_prefix) settings the 2-rank torchrun run checks against one process
SYNC_SHARED = ((False, False), (True, False), (False, True))


def make_case(loss_agg: str = "token-mean", shared_prefix: bool = False):
    """A tiny fp32 model and 16 rollouts (4 prompts x G=4) of uneven prompt and completion lengths; shared_prefix
    makes one_step train on group-shaped micro-batches (each prompt computed once per micro-batch)."""
    torch.manual_seed(0)
    model = Qwen2(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    rng = random.Random(0)
    # adam_eps >> tiny gradients keeps Adam's first step (~ lr * sign(g)) continuous, so parameters can be compared
    cfg = TrainConfig(temperature=0.9, max_response_len=12, grad_clip=0.05, lr=1e-2, adam_eps=1e-3,
                      grpo=GRPOConfig(kl_coef=0.0, loss_agg=loss_agg, clip_low=0.2, clip_high=0.28),
                      shared_prefix=shared_prefix)
    rewards = torch.tensor([float(rng.randint(-3, 6)) for _ in range(GROUP * PROMPTS)])
    adv, _ = group_advantages(rewards, GROUP, cfg.grpo)
    seqs = []
    for p in range(PROMPTS):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(3, 9))]
        for g in range(GROUP):
            n = rng.randint(2, 12)
            completion = [rng.randrange(1, VOCAB) for _ in range(n)]
            old_logp = [-rng.uniform(3.5, 4.5) for _ in range(n)]  # pi_old, carried as the sampler's log-probs
            seqs.append(TrainSequence(prompt, completion, advantage=float(adv[p * GROUP + g]), sampler_logp=old_logp,
                                      group=p))
    return model, seqs, cfg


def one_step(model, seqs, cfg, d, micro_batch_size: int):
    """Accumulate the step's gradient over micro-batches, take one AdamW step; return (full grads, full params)."""
    optimizer = new_optimizer(model, cfg, "grpo")
    mbs = microbatches(seqs, micro_batch_size, pad_id=0, device=d.device, shared=cfg.shared_prefix)
    norm = loss_norm([mb.mask for mb in mbs], cfg.max_response_len, world_reduce=distributed.all_reduce)

    for mb in mbs:  # pi_old: the given log-probs
        mb.old_logp = mb.sampler_logp
    models = Models(model, None, model, contextlib.nullcontext())
    loss_sum, _ = accumulate_gradients(models, mbs, grpo_objective(cfg, norm, {}), cfg.temperature, True, VOCAB, cfg, d)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.detach().clone()
    optimizer_step(model, optimizer, cfg, loss_sum)
    return grads, {k: v.clone() for k, v in distributed.gather_full_params(model, torch.float32, dst=d.rank)}
