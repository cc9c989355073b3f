"""GRPO math against hand-computed values, gradients, and micro-batch / rank split invariance."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sqlr1.grpo import (
    GRPOConfig,
    LossInputs,
    LossNorm,
    finalize_metrics,
    finalize_mismatch,
    group_advantages,
    loss_norm,
    policy_loss,
    rollout_mismatch,
    sft_loss,
    tis_weights,
    train_rows,
)

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def grpo_loss(logp, old, ref, adv, mask, cfg, norm, entropy=None, sampler_logp=None):
    """policy_loss with the micro-batch's tensors as arguments."""
    return policy_loss(LossInputs(logp, old, adv, mask, ref, entropy, sampler_logp), cfg, norm)


# ---------------------------------------------------------------- advantages


def test_group_advantages_unbiased_and_population():
    rewards = torch.tensor([1.0, 2, 3, 4, 5, 5, 5, 5])
    centred = [-1.5, -0.5, 0.5, 1.5]  # group mean 2.5
    for unbiased, var in ((True, 5 / 3), (False, 5 / 4)):  # sum of squares 5, over G-1 or G
        adv, stats = group_advantages(rewards, 4, GRPOConfig(std_unbiased=unbiased))
        expected = [c / (math.sqrt(var) + 1e-6) for c in centred] + [0.0] * 4
        torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-6, atol=1e-7)
        assert stats["frac_zero_std"] == 0.5


def test_batch_and_none_scales_and_std_floor():
    rewards = torch.tensor([1.0, 2, 3, 4, 5, 5, 5, 5])
    centred = torch.tensor([-1.5, -0.5, 0.5, 1.5, 0, 0, 0, 0])
    # batch mean 3.75, squared deviations sum to 17.5, unbiased var 17.5 / 7 = 2.5
    adv, _ = group_advantages(rewards, 4, GRPOConfig(adv_scale="batch", adv_eps=0.0))
    torch.testing.assert_close(adv, centred / math.sqrt(2.5))
    adv, _ = group_advantages(rewards, 4, GRPOConfig(adv_scale="none"))
    torch.testing.assert_close(adv, centred)
    nearly_constant = torch.tensor([0.0, 0, 0, 0.01])
    adv, _ = group_advantages(nearly_constant, 4, GRPOConfig(std_floor=0.5, adv_eps=0.0))
    torch.testing.assert_close(adv, torch.tensor([-0.0025, -0.0025, -0.0025, 0.0075]) / 0.5)


def test_singleton_and_all_equal_groups_give_zero_advantage():
    adv, stats = group_advantages(torch.tensor([0.3, 1.0, -2.0]), 1, GRPOConfig())
    assert torch.equal(adv, torch.zeros(3)) and stats["frac_zero_std"] == 1.0
    adv, stats = group_advantages(torch.full((8,), 0.1 + 0.2), 4, GRPOConfig())
    assert torch.equal(adv, torch.zeros(8)) and stats["frac_zero_std"] == 1.0


def test_bad_shapes_and_config_name_the_argument():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(torch.zeros(7), 4, GRPOConfig())
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        group_advantages(torch.zeros(2, 4), 4, GRPOConfig())
    with pytest.raises(ValueError, match="loss_agg"):
        GRPOConfig(loss_agg="sum")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(x, torch.zeros(2, 4), None, torch.zeros(2), x, GRPOConfig(kl_coef=0), LossNorm(1, 1, 3))
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(x, x, None, torch.zeros(2), x, GRPOConfig(kl_coef=0.1), LossNorm(1, 1, 3))


def test_dapo_filter_keeps_exactly_the_groups_whose_rewards_differ():
    rewards = torch.tensor([1.0, 1, 1, 0, 1, 0, 0.3, 0.3, 0.3, 0, 0, 1e-7])
    rows, weights = train_rows(rewards, 3, GRPOConfig(drop_zero_std_groups=True))
    assert rows == [3, 4, 5, 9, 10, 11] and weights == [1.0] * 6
    assert train_rows(rewards, 3, GRPOConfig()) == (list(range(12)), [1.0] * 12)
    equal = torch.tensor([2.0] * 6)
    assert train_rows(equal, 3, GRPOConfig(drop_zero_std_groups=True)) == ([], [])  # the step trains nothing
    other_rank_kept_some = lambda t: t + 3  # world_reduce: another rank kept 3 completions
    assert train_rows(equal, 3, GRPOConfig(drop_zero_std_groups=True), other_rank_kept_some) == ([0], [0.0])


# ---------------------------------------------------------------- policy loss, hand-computed

# Two sequences of 3 tokens, eps = 0.2. Seq 0: A=+1, 2 tokens, ratios 0.7 (A>0: unclipped side, kept) and 1.5
# (clipped high to 1.2). Seq 1: A=-2, 3 tokens, ratios 0.5 (clipped low to 0.8), 1.0, 1.3 (A<0: unclipped side).
# Token losses -min(rho A, clip(rho) A): seq 0: -0.7, -1.2; seq 1: 1.6, 2.0, 2.6.
RATIOS = [[0.7, 1.5, 7.0], [0.5, 1.0, 1.3]]
MASK = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
HAND = {
    "token-mean": (-0.7 - 1.2 + 1.6 + 2.0 + 2.6) / 5,  # 0.86
    "seq-mean-token-mean": ((-0.7 - 1.2) / 2 + (1.6 + 2.0 + 2.6) / 3) / 2,
    "seq-mean-token-sum-norm": ((-0.7 - 1.2) / 4 + (1.6 + 2.0 + 2.6) / 4) / 2,  # L = 4
}


def tiny_case():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.2, -3.0]], dtype=torch.float64)
    logp = (old + torch.tensor(RATIOS, dtype=torch.float64).log()).requires_grad_()
    mask = torch.tensor(MASK, dtype=torch.float64)
    return logp, old, torch.tensor([1.0, -2.0], dtype=torch.float64), mask


@pytest.mark.parametrize("agg", AGGS)
def test_loss_matches_hand_computation(agg):
    logp, old, adv, mask = tiny_case()
    norm = loss_norm([mask], max_len=4)
    assert (norm.num_tokens, norm.num_seqs) == (5, 2)
    loss, metrics = grpo_loss(logp, old, None, adv, mask, GRPOConfig(kl_coef=0.0, loss_agg=agg), norm)
    assert loss.item() == pytest.approx(HAND[agg], rel=1e-12)
    means = finalize_metrics(metrics)
    assert means["clip_low"] == pytest.approx(1 / 5) and means["clip_high"] == pytest.approx(1 / 5)
    assert means["ratio"] == pytest.approx((0.7 + 1.5 + 0.5 + 1.0 + 1.3) / 5)
    log_r = torch.tensor([0.7, 1.5, 0.5, 1.0, 1.3]).log()
    assert means["kl_old"] == pytest.approx((0.5 * log_r**2).mean().item(), rel=1e-6)  # k2 estimate


def test_k3_kl_and_entropy_terms_by_hand():
    logp, old, adv, mask = tiny_case()
    ent = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]], dtype=torch.float64)  # true entropies H_t
    # log pi_ref - log pi = ln 2 at (0,0) and ln 4 at (1,2): k3 = e^d - d - 1 = (1 - ln 2) + (3 - 2 ln 2);
    # a huge ref offset at the masked position (0,2) must be ignored.
    delta = torch.zeros(2, 3, dtype=torch.float64)
    delta[0, 0], delta[1, 2], delta[0, 2] = math.log(2), math.log(4), 50.0
    ref = logp.detach() + delta
    cfg = GRPOConfig(kl_coef=0.1, entropy_coef=0.01)
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, cfg, loss_norm([mask], 4), entropy=ent)
    kl_sum = 4 - 3 * math.log(2)
    assert loss.item() == pytest.approx(HAND["token-mean"] + 0.1 * kl_sum / 5 - 0.01 * 15 / 5, rel=1e-12)
    means = finalize_metrics(metrics)
    assert means["kl_ref"] == pytest.approx(kl_sum / 5) and means["entropy"] == pytest.approx(15 / 5)
    loss.backward()  # d k3 / d logp = 1 - e^d: -1 at (0,0), -3 at (1,2); clipped (0,1) keeps only its KL gradient 0
    assert logp.grad[0, 0].item() == pytest.approx((-0.7 + 0.1 * -1) / 5)
    assert logp.grad[1, 2].item() == pytest.approx((2.6 + 0.1 * -3) / 5)
    assert logp.grad[0, 2].item() == 0


def test_clipped_side_has_exactly_zero_gradient():
    logp, old, adv, mask = tiny_case()
    loss, _ = grpo_loss(logp, old, None, adv, mask, GRPOConfig(kl_coef=0.0), loss_norm([mask], 4))
    loss.backward()
    # d l_t / d logp_t = -A rho_t / N inside the clip region (or on the unclipped side), 0 where clipped.
    expected = torch.tensor([[-0.7 / 5, 0.0, 0.0], [0.0, 2.0 / 5, 2 * 1.3 / 5]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)
    assert logp.grad[0, 1] == 0 and logp.grad[1, 0] == 0  # exactly zero, not just small


def test_clip_higher_is_asymmetric():
    old = torch.zeros(2, 1, dtype=torch.float64)
    logp = torch.tensor([[math.log(1.25)], [math.log(0.75)]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 1, dtype=torch.float64)
    cfg = GRPOConfig(kl_coef=0.0, clip_low=0.2, clip_high=0.28)  # DAPO: 1.25 < 1.28 is inside, 0.75 < 0.8 is not
    loss, metrics = grpo_loss(logp, old, None, torch.tensor([1.0, -1.0]), mask, cfg, loss_norm([mask], 1))
    loss.backward()
    assert loss.item() == pytest.approx((-1.25 + 0.8) / 2)
    assert logp.grad[0, 0] != 0 and logp.grad[1, 0] == 0
    assert metrics["clip_high_sum"].item() == 0 and metrics["clip_low_sum"].item() == 1


def test_log_ratio_is_clamped():
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.tensor([[3.0, 0.0]], dtype=torch.float64, requires_grad=True)  # log rho = 3 > max_log_ratio = 2
    mask = torch.ones(1, 2, dtype=torch.float64)
    cfg = GRPOConfig(kl_coef=0.0, max_log_ratio=2.0)
    loss, _ = grpo_loss(logp, old, None, torch.tensor([-1.0]), mask, cfg, loss_norm([mask], 2))
    loss.backward()
    assert loss.item() == pytest.approx((math.exp(2) + 1) / 2)  # A<0, unclipped side: -rho A with rho = e^2
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_mask_is_explicit_stop_token_equal_to_pad_still_counts(ratio_level):
    pad_id = stop_id = 151645  # Qwen: <|im_end|> is both the stop token and the pad token
    ids = torch.tensor([[11, 22, stop_id, pad_id], [33, stop_id, pad_id, pad_id]])
    lengths = torch.tensor([3, 2])  # generated tokens, stop included: the sampler knows these
    mask = (torch.arange(4)[None] < lengths[:, None]).double()
    old = torch.full((2, 4), -1.0, dtype=torch.float64)
    ref, ent = old - 0.5, torch.ones(2, 4, dtype=torch.float64)
    for garbage in (old, ref, ent):  # nan at a padded position must not leak into loss or gradient
        garbage[1, 3] = float("nan")
    logp = old.clone().requires_grad_()
    cfg = GRPOConfig(kl_coef=0.1, entropy_coef=0.01, ratio_level=ratio_level)
    loss, _ = grpo_loss(logp, old, ref, torch.tensor([1.0, -1.0]), mask, cfg, loss_norm([mask], 4), ent)
    loss.backward()
    assert logp.grad[0, 2] != 0 and logp.grad[1, 1] != 0  # stop tokens (id == pad id) are trained on
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[1, 2:].eq(0).all()
    id_mask = (ids != pad_id).double()  # the trap: deriving the mask from ids drops the stop tokens
    assert id_mask.sum() == mask.sum() - 2


def test_sft_loss_uses_global_token_count():
    logp = torch.tensor([[-1.0, -2.0, -float("inf")], [-3.0, -4.0, -5.0]])  # masked garbage is ignored
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    norm = loss_norm([mask, torch.ones(1, 5)], max_len=8)  # a second micro-batch with 5 more tokens
    assert sft_loss(logp, mask, norm).item() == pytest.approx((1 + 2 + 3 + 4 + 5) / 10)


# ---------------------------------------------------------------- split invariance


def random_step(seed=0, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 2, 5, 1, 7, 3])
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logp, old, ref, ent, adv, mask


def microbatch_loss(leaf, old, ref, ent, adv, mask, cfg, splits, norm=None):
    """Sum of policy_loss over row slices, each trimmed to its own longest completion (uneven T)."""
    bounds = [0] + torch.tensor(splits).cumsum(0).tolist()
    pieces = [(slice(a, b), int(mask[a:b].sum(1).max())) for a, b in zip(bounds, bounds[1:])]
    masks = [mask[r, :t] for r, t in pieces]
    total = 0.0
    for (r, t), m in zip(pieces, masks):
        n = norm if norm is not None else loss_norm([m], 9)  # norm=None: the naive per-micro-batch normaliser
        args = (leaf[r, :t], old[r, :t], ref[r, :t], adv[r], m, cfg, n, ent[r, :t])
        total = total + grpo_loss(*args)[0] / (1 if norm is not None else len(pieces))
    return total


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("agg", AGGS)
def test_loss_and_grad_invariant_to_micro_batching(agg, ratio_level):
    logp, old, ref, ent, adv, mask = random_step()
    cfg = GRPOConfig(loss_agg=agg, ratio_level=ratio_level, kl_coef=0.05, entropy_coef=0.01, clip_high=0.28)
    norm = loss_norm([mask], max_len=9)
    grads, losses = [], []
    for splits in ([6], [1, 2, 1, 2]):
        leaf = logp.clone().requires_grad_()
        loss = microbatch_loss(leaf, old, ref, ent, adv, mask, cfg, splits, norm)
        loss.backward()
        losses.append(loss.item())
        grads.append(leaf.grad)
    assert losses[0] == pytest.approx(losses[1], rel=1e-13, abs=1e-15)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)
    assert grads[0].abs().sum() > 0


def test_naive_per_microbatch_mean_differs():
    logp, old, ref, ent, adv, mask = random_step()
    cfg = GRPOConfig()
    exact = microbatch_loss(logp, old, ref, ent, adv, mask, cfg, [6], loss_norm([mask], 9))
    naive = microbatch_loss(logp, old, ref, ent, adv, mask, cfg, [1, 2, 1, 2])
    assert abs(exact.item() - naive.item()) > 1e-3  # averaging micro-batch means reweights short micro-batches


STEP_REWARDS = torch.tensor([0.0, 1, 0, 0, 0.1, 0, 0.1, 0.1])  # 4 groups of 2


def _rank_worker(rank, port, result_queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:

        def world_sum(t):
            dist.all_reduce(t)
            return t

        logp, old, ref, ent, adv, mask = random_step()
        leaf = logp.clone().requires_grad_()
        rows, splits = (slice(0, 2), [1, 1]) if rank == 0 else (slice(2, 6), [1, 3])  # uneven data per rank
        local = [mask[rows][:1], mask[rows][1:]]
        norm = loss_norm(local, max_len=9, world_reduce=world_sum)
        cfg = GRPOConfig(loss_agg="seq-mean-token-mean", kl_coef=0.05)
        parts = (leaf[rows], old[rows], ref[rows], ent[rows], adv[rows], mask[rows])
        loss = microbatch_loss(*parts, cfg, splits, norm)
        loss.backward()
        summed = world_sum(loss.detach().clone())
        grad = world_sum(leaf.grad.clone())  # a SUM all-reduce (DDP averages: the trainer scales by world_size)
        # batch-scaled advantages from this rank's whole groups (rank 0: 1 group, rank 1: 3) use the step's std
        rewards = STEP_REWARDS[:2] if rank == 0 else STEP_REWARDS[2:]
        batch_adv, _ = group_advantages(rewards, 2, GRPOConfig(adv_scale="batch"), world_reduce=world_sum)
        result_queue.put((rank, summed.item(), grad, (norm.num_tokens, norm.num_seqs), batch_adv))
    finally:
        dist.destroy_process_group()


def test_loss_norm_and_batch_std_across_two_real_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    logp, old, ref, ent, adv, mask = random_step()
    leaf = logp.clone().requires_grad_()
    cfg = GRPOConfig(loss_agg="seq-mean-token-mean", kl_coef=0.05)
    full = microbatch_loss(leaf, old, ref, ent, adv, mask, cfg, [6], loss_norm([mask], 9))
    full.backward()
    for _, loss, grad, counts, _ in results:
        assert counts == (mask.sum().item(), 6.0)
        assert loss == pytest.approx(full.item(), rel=1e-13)
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-12, atol=1e-15)
    batch_adv = torch.cat([adv for _, *_, adv in sorted(results, key=lambda r: r[0])])
    torch.testing.assert_close(batch_adv, group_advantages(STEP_REWARDS, 2, GRPOConfig(adv_scale="batch"))[0])


# ---------------------------------------------------------------- GSPO


@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("agg", AGGS)
def test_gspo_at_ratio_one_matches_token_level(agg, per_token_adv):
    logp, _, ref, ent, adv, mask = random_step(seed=1)
    if per_token_adv:  # GSPO-token: only the stop-gradient form keeps token-specific advantages apart
        adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = []
    for level in ("token", "sequence"):
        leaf = logp.clone().requires_grad_()
        cfg = GRPOConfig(ratio_level=level, loss_agg=agg, kl_coef=0.0)
        loss, metrics = grpo_loss(leaf, logp, None, adv, mask, cfg, loss_norm([mask], 9))
        loss.backward()
        assert metrics["ratio_sum"].item() == pytest.approx(mask.sum().item())  # every ratio is 1
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)


def test_gspo_token_equals_sequence_objective():
    logp, old, _, _, adv, mask = random_step(seed=2)
    cfg = GRPOConfig(ratio_level="sequence", loss_agg="seq-mean-token-mean", kl_coef=0.0, clip_low=0.5, clip_high=0.5)
    leaf = logp.clone().requires_grad_()
    loss, _ = grpo_loss(leaf, old, None, adv, mask, cfg, loss_norm([mask], 9))
    loss.backward()
    direct_leaf = logp.clone().requires_grad_()  # GSPO eq.: -mean_i min(s_i A_i, clip(s_i) A_i), no stop-gradient
    s = torch.exp(((direct_leaf - old) * mask).sum(1) / mask.sum(1))
    direct = -torch.min(s * adv, s.clamp(0.5, 1.5) * adv).mean()
    direct.backward()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-12)
    torch.testing.assert_close(leaf.grad, direct_leaf.grad, rtol=1e-12, atol=1e-15)


def test_gspo_clipping_zeroes_whole_sequences():
    old = torch.zeros(2, 4, dtype=torch.float64)
    # seq 0: token log-ratios far outside eps individually but with mean 0.01 -> s inside [0.8, 1.2];
    # seq 1: mean log-ratio 0.5 -> s = 1.65 > 1.2 with A > 0: the whole sequence is clipped.
    logp = torch.tensor([[0.5, -0.5, 0.04, 0.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64).requires_grad_()
    mask = torch.ones(2, 4, dtype=torch.float64)
    cfg = GRPOConfig(ratio_level="sequence", kl_coef=0.0)
    loss, metrics = grpo_loss(logp, old, None, torch.tensor([1.0, 1.0]), mask, cfg, loss_norm([mask], 4))
    loss.backward()
    assert (logp.grad[0] != 0).all() and (logp.grad[1] == 0).all()
    assert metrics["clip_high_sum"].item() == 4


# ---------------------------------------------------------------- rollout/trainer mismatch, TIS


def test_tis_weights_are_capped_ratios_on_known_numbers():
    old = torch.tensor([[0.5, 0.9, 0.3, 0.8]]).log()
    sampler = torch.tensor([[0.25, 0.9, 0.6, 0.1]]).log()
    w = tis_weights(old, sampler, cap=1.5)  # ratios 2, 1, 0.5, 8 -> capped at 1.5
    torch.testing.assert_close(w, torch.tensor([[1.5, 1.0, 0.5, 1.5]]))
    torch.testing.assert_close(tis_weights(old, sampler, cap=10.0), torch.tensor([[2.0, 1.0, 0.5, 8.0]]))
    for bad in (0.5, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cap"):
            tis_weights(old, sampler, cap=bad)


def test_tis_multiplies_only_the_policy_gradient_term():
    """l_t = -w_t min(rho A, clip(rho) A) + beta k3_t, w_t = min(exp(old - sampler), C), by hand; w carries no grad."""
    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    logp = (old + torch.tensor([[0.1, -0.05, 0.3]], dtype=torch.float64)).requires_grad_()
    sampler = old - torch.tensor([[0.5, -0.2, 2.0]], dtype=torch.float64)  # w = e^0.5, e^-0.2, min(e^2, 2) = 2
    ref = old + 0.2
    mask = torch.ones(1, 3, dtype=torch.float64)
    adv = torch.tensor([1.5], dtype=torch.float64)
    cfg = GRPOConfig(kl_coef=0.1, clip_low=0.2, clip_high=0.2, tis_cap=2.0)
    norm = loss_norm([mask], max_len=4)
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, cfg, norm, sampler_logp=sampler)
    rho = torch.exp(logp.detach() - old)
    pg = -torch.min(rho * 1.5, rho.clamp(0.8, 1.2) * 1.5)
    w = torch.tensor([[math.exp(0.5), math.exp(-0.2), 2.0]], dtype=torch.float64)
    delta = ref - logp.detach()
    k3 = delta.exp() - delta - 1
    assert loss.item() == pytest.approx(((w * pg + 0.1 * k3).sum() / 3).item(), rel=1e-12)
    assert finalize_metrics(metrics)["tis_weight"] == pytest.approx(w.mean().item(), rel=1e-12)
    loss.backward()
    unclipped = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)  # rho_3 = e^0.3 > 1.2 with A > 0: clipped
    grad = (-w * 1.5 * rho * unclipped + 0.1 * (1 - delta.exp())) / 3
    torch.testing.assert_close(logp.grad, grad)
    off, _ = grpo_loss(logp, old, ref, adv, mask, GRPOConfig(kl_coef=0.1, clip_low=0.2, clip_high=0.2), norm)
    assert off.item() == pytest.approx(((pg + 0.1 * k3).sum() / 3).item(), rel=1e-12)
    with pytest.raises(ValueError, match="sampler_logp"):
        grpo_loss(logp, old, ref, adv, mask, cfg, norm)


def test_tis_cap_is_validated():
    for ok in (0.0, 1.0, 2.0):
        GRPOConfig(tis_cap=ok)
    for bad in (0.5, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tis_cap"):
            GRPOConfig(tis_cap=bad)


def test_rollout_mismatch_on_known_numbers():
    """|log rho_sampler| mean and the token / sequence fractions outside [1 - 0.2, 1 + 0.25], masked rows ignored."""
    log_rho = torch.tensor([[0.1, -0.3, 0.0, 9.0],   # tokens out: -0.3 (< log 0.8); seq mean -0.0667: in
                            [0.3, 0.3, 0.0, 0.0],    # out: both; seq mean 0.3 > log 1.25 = 0.223: out
                            [-0.1, 0.0, 0.0, 0.0]])  # in; seq in
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    sampler = torch.full((3, 4), -2.0)
    sums = rollout_mismatch(sampler + log_rho, sampler, mask, GRPOConfig(clip_low=0.2, clip_high=0.25))
    assert float(sums["mismatch_tokens"]) == 6 and float(sums["mismatch_seqs"]) == 3
    out = finalize_mismatch(sums)
    assert out["mismatch_abs_log_rho"] == pytest.approx((0.1 + 0.3 + 0.0 + 0.3 + 0.3 + 0.1) / 6, rel=1e-6)
    assert out["mismatch_clip_frac_tokens"] == pytest.approx(3 / 6)
    assert out["mismatch_clip_frac_seqs"] == pytest.approx(1 / 3)
    same = finalize_mismatch(rollout_mismatch(sampler, sampler, mask, GRPOConfig()))
    assert same == {"mismatch_abs_log_rho": 0.0, "mismatch_clip_frac_tokens": 0.0, "mismatch_clip_frac_seqs": 0.0}


def test_cispo_is_reinforce_weighted_by_the_capped_ratio_and_keeps_every_token():
    """l_t = -sg(min(rho_t, 1 + eps_high)) A log pi_t, token-mean: on hand-computed numbers; a token whose ratio is
    past the band keeps a capped gradient where the clipped surrogate gives none; on-policy both gradients agree."""
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = logp.detach() - torch.tensor([[0.0, 0.5, -0.5]])  # rho = 1, e^0.5 = 1.65, e^-0.5 = 0.61
    adv, mask, norm = torch.tensor([2.0]), torch.ones(1, 3), loss_norm([torch.ones(1, 3)], 3)
    cispo = GRPOConfig(kl_coef=0.0, pg_term="cispo", clip_high=0.2)
    weight = torch.tensor([[1.0, 1.2, math.exp(-0.5)]])  # min(rho, 1.2): no lower bound
    loss, metrics = grpo_loss(logp, old, None, adv, mask, cispo, norm)
    torch.testing.assert_close(loss, -(weight * 2.0 * logp.detach()).sum() / 3)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -weight * 2.0 / 3)
    clip, _ = grpo_loss(logp, old, None, adv, mask, GRPOConfig(kl_coef=0.0, clip_high=0.2), norm)
    (clip_grad,) = torch.autograd.grad(clip, logp)
    assert clip_grad[0, 1] == 0 and grad[0, 1] != 0  # past 1 + eps_high with A > 0: dropped vs capped
    assert metrics["clip_high_sum"] == 1  # the capped token is counted as clipped
    for cfg in (cispo, GRPOConfig(kl_coef=0.0, clip_high=0.2)):  # rho = 1: the same gradient
        on_policy, _ = grpo_loss(logp, logp.detach(), None, adv, mask, cfg, norm)
        torch.testing.assert_close(torch.autograd.grad(on_policy, logp)[0], torch.full((1, 3), -2.0 / 3))
    with pytest.raises(ValueError, match="pg_term"):
        GRPOConfig(pg_term="reinforce")
