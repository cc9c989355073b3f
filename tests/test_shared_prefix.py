"""Shared-prefix log-probs (Qwen2.shared_prefix_logprobs, batch.py's group-shaped micro-batches) equal the unshared
forward in value and in every parameter's gradient after a GRPO loss, while computing each prompt once per group."""

import random

import pytest
import torch

from sqlr1.batch import TrainSequence, collate, split_micro_batches
from sqlr1.grpo import LOSS_AGGS, GRPOConfig, LossInputs, loss_norm, policy_loss
from sqlr1.model import ModelConfig, Qwen2
from sqlr1.update import logprobs
from tests.test_model import ROWS, VOCAB

EOS = 0  # a base model: the stop token is also the pad id
MAX_NEW = 9


def tiny_model(tie: bool = False) -> Qwen2:
    """GQA (6 query heads on 2 KV heads), padded vocab rows, non-trivial biases and norms. Weights std 0.1: at 0.3
    (tests/test_model.py) gradients reach ~100 and fp32 rounding alone moves them by ~1e-4."""
    cfg = ModelConfig(vocab_size=ROWS, hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=64, rope_theta=10_000.0, tie_word_embeddings=tie)
    model = Qwen2(cfg)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    return model


def grouped_sequences(seed: int = 0) -> list[TrainSequence]:
    """3 prompts (lengths 7, 2, 11) x G = 3 completions of lengths 1..MAX_NEW, interleaved across groups: one
    completion per group stops with EOS (== pad), one is truncated at MAX_NEW tokens without a stop token."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, VOCAB) for _ in range(n)] for n in (7, 2, 11)]
    seqs = []
    for g, (p, lengths) in enumerate(zip(prompts, ([3, MAX_NEW, 1], [MAX_NEW, 5, 2], [4, 1, MAX_NEW]))):
        for k, n in enumerate(lengths):
            tokens = [rng.randrange(1, VOCAB) for _ in range(n)]
            if k == 0:
                tokens[-1] = EOS  # finished: the stop token is a scored completion token
            old_logp = [-rng.uniform(3.0, 5.0) for _ in range(n)]  # pi_old, carried as the sampler's
            seqs.append(TrainSequence(p, tokens, advantage=rng.uniform(-1.5, 1.5), sampler_logp=old_logp, group=g))
    return [seqs[i] for i in (0, 3, 6, 1, 4, 7, 2, 5, 8)]  # rows of a group need not be adjacent


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def grpo_grads(model, mb, loss_agg: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """log-probs, entropy and every parameter's gradient of the clipped GRPO loss + KL + entropy bonus."""
    model.zero_grad(set_to_none=True)
    logp, entropy = logprobs(model, mb, temperature=0.9, vocab_size=VOCAB, with_entropy=True)
    cfg = GRPOConfig(loss_agg=loss_agg, kl_coef=0.1, entropy_coef=0.01, clip_low=0.2, clip_high=0.28)
    old = mb.sampler_logp
    ref = old + 0.3 * torch.sin(torch.arange(old.numel()).view(old.shape).float())
    loss, _ = policy_loss(LossInputs(logp, old, mb.advantages, mb.mask, ref, entropy), cfg, loss_norm([mb.mask], MAX_NEW))
    loss.backward()
    return logp.detach(), entropy.detach(), grads(model)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_shared_prefix_equals_unshared_logprobs_and_grads(tie, loss_agg):
    model = tiny_model(tie)
    seqs = grouped_sequences()
    unshared, shared = collate(seqs, EOS), collate(seqs, EOS, shared=True)
    assert unshared.group is None and shared.group.tolist() == [0, 1, 2] * 3
    lp0, ent0, g0 = grpo_grads(model, unshared, loss_agg)
    lp1, ent1, g1 = grpo_grads(model, shared, loss_agg)
    on = shared.mask.bool()
    torch.testing.assert_close(lp1[on], lp0[on], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent1[on], ent0[on], atol=1e-5, rtol=0)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert min(g.abs().max() for g in g0.values()) > 1e-4  # every parameter takes part


def test_shared_prefix_with_checkpointing_and_small_head_chunks():
    """Activation checkpointing per block and a chunked head give the same log-probs and gradients."""
    model = tiny_model()
    mb = collate(grouped_sequences(seed=1), EOS, shared=True)
    lp0, _, g0 = grpo_grads(model, collate(grouped_sequences(seed=1), EOS), "token-mean")
    model.gradient_checkpointing = True
    lp1, _, g1 = grpo_grads(model, mb, "token-mean")
    on = mb.mask.bool()
    torch.testing.assert_close(lp1[on], lp0[on], atol=1e-5, rtol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        small, _ = model.shared_prefix_logprobs(mb.input_ids, mb.attention_mask, mb.start, mb.group, 0.9,
                                                vocab_size=VOCAB, chunk_size=5)
    torch.testing.assert_close(small[on], lp1[on], atol=1e-6, rtol=0)


def test_each_prompt_goes_through_the_model_once():
    model = tiny_model()
    seqs = grouped_sequences()
    mb = collate(seqs, EOS, shared=True)
    seen = []
    hook = model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    with torch.no_grad():
        logprobs(model, mb, 1.0, VOCAB)
    hook.remove()
    P, C = mb.start + 1, mb.mask.shape[1]
    assert sum(seen) == 3 * P + len(seqs) * C  # 3 prompt rows + 9 completion rows, not 9 x (P + C)


def test_group_shaped_micro_batches_hold_whole_groups():
    seqs = grouped_sequences()
    chunks = split_micro_batches(seqs, 6, shared=True)  # two groups of 3 fit in 6 rows
    assert [len(c) for c in chunks] == [6, 3]
    assert all(len({s.group for s in c}) == len(c) // 3 for c in chunks)
    assert sorted(id(s) for c in chunks for s in c) == sorted(id(s) for s in seqs)
    small = split_micro_batches(seqs, 2, shared=True)  # G = 3 > 2 rows: each group cut into micro-batches alone
    assert [len(c) for c in small] == [2, 1] * 3 and all(len({s.group for s in c}) == 1 for c in small)
    padded = split_micro_batches(seqs, 6, num_micro=4, shared=True)
    assert len(padded) == 4 and all(s.weight == 0 and s.group >= 0 for c in padded[2:] for s in c)
    dropped = [s for s in seqs if s.group != 1]  # DAPO dropped group 1: it occupies no row
    assert [len(c) for c in split_micro_batches(dropped, 6, shared=True)] == [6]


def test_group_shaped_collate_rejects_bad_groups():
    with pytest.raises(ValueError, match="group 4 holds two different prompts"):
        collate([TrainSequence([1, 2], [3], group=4), TrainSequence([1, 5], [3], group=4)], EOS, shared=True)
    with pytest.raises(ValueError, match="needs its prompt's group id"):
        collate([TrainSequence([1, 2], [3])], EOS, shared=True)
