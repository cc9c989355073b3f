"""The training loop's machinery: split invariance (micro-batches and FSDP ranks), updates, learning, NaN guard."""

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqlr1.batch import Sequence, collate
from sqlr1.distributed import Dist
from sqlr1.grpo import group_advantages, loss_norm
from sqlr1.model import ModelConfig, Qwen2
from sqlr1.sampling import generate
from tests.split_case import LOSS_MODES, make_case, one_step
from sqlr1.update import make_optimizer, microbatches, optimizer_step, train_on_micro_batches
from train import step_indices

ROOT = Path(__file__).resolve().parents[1]


def assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_gradient_does_not_depend_on_micro_batching(mode):
    model, seqs, cfg = make_case(mode)
    g1, p1 = one_step(model, seqs, cfg, Dist(), micro_batch_size=len(seqs))
    model, seqs, cfg = make_case(mode)
    g4, p4 = one_step(model, seqs, cfg, Dist(), micro_batch_size=4)
    assert_same(g1, g4, atol=1e-6)
    assert_same(p1, p4, atol=1e-6)
    assert max(g.abs().max() for g in g1.values()) > 1e-3  # the step did something


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_shared_prefix_step_equals_unshared(mode):
    """Group-shaped micro-batches: 4 whole groups in one, one group each, and G = 4 cut into 3 + 1 rows (the
    prompt recomputed per part) all give the unshared single-micro-batch step."""
    model, seqs, cfg = make_case(mode)
    g1, p1 = one_step(model, seqs, cfg, Dist(), micro_batch_size=len(seqs))
    for micro_batch_size in (len(seqs), 4, 3):
        model, seqs, cfg = make_case(mode, shared_prefix=True)
        gs, ps = one_step(model, seqs, cfg, Dist(), micro_batch_size=micro_batch_size)
        assert_same(g1, gs, atol=1e-6)
        assert_same(p1, ps, atol=1e-6)


def test_fsdp_two_ranks_match_one_process(tmp_path):
    """torchrun, gloo, FSDP2 fully_shard: 2 ranks x 2 micro-batches == 1 process x 1 micro-batch, unshared and with
    shared-prefix micro-batches (the shared forward methods registered with FSDP)."""
    out = tmp_path / "dist.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "dist_split.py"), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_results = torch.load(out)
    for mode in LOSS_MODES:
        model, seqs, cfg = make_case(mode)
        g1, p1 = one_step(model, seqs, cfg, Dist(), micro_batch_size=len(seqs))
        for shared in (False, True):
            g2, p2 = dist_results[mode, shared]
            assert_same(g1, g2, atol=1e-6)
            assert_same(p1, p2, atol=1e-6)


def test_every_parameter_changes_and_reference_does_not():
    model, seqs, cfg = make_case()
    cfg.grpo.kl_coef = 0.05
    ref = Qwen2(model.config)
    ref.load_state_dict(model.state_dict())
    ref.requires_grad_(False)
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt, sched = make_optimizer(model, cfg, 1e-3, 1)
    mbs = microbatches(seqs, 4, 0, "cpu")
    for mb in mbs:
        with torch.no_grad():
            mb.ref_logp = ref.token_logprobs(mb.input_ids, mb.attention_mask, start=mb.start, temperature=cfg.temperature)[0]
    norm = loss_norm([mb.mask for mb in mbs], cfg.max_response_len)
    loss, _ = train_on_micro_batches(model, mbs, norm, cfg, Dist(), contextlib.nullcontext(), 61, sft=False)
    grad_norm, _, ok = optimizer_step(model, opt, sched, cfg, loss)
    assert ok and grad_norm > 0
    unchanged = [k for k, v in model.state_dict().items() if torch.equal(v, before[k])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    assert all(torch.equal(v, ref_before[k]) for k, v in ref.state_dict().items())


def test_non_finite_step_is_skipped():
    model, seqs, cfg = make_case()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt, sched = make_optimizer(model, cfg, 1e-3, 1)
    mbs = microbatches(seqs, 16, 0, "cpu")
    mbs[0].advantages[0] = float("nan")
    norm = loss_norm([mb.mask for mb in mbs], cfg.max_response_len)
    loss, _ = train_on_micro_batches(model, mbs, norm, cfg, Dist(), contextlib.nullcontext(), 61, sft=False)
    grad_norm, _, ok = optimizer_step(model, opt, sched, cfg, loss)
    assert not ok and not math.isfinite(grad_norm)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_collate_uses_explicit_completion_mask_even_when_pad_is_eos():
    eos = 5  # a base model: pad id == EOS id
    mb = collate([Sequence([1, 2, 3], [7, eos]), Sequence([4], [8, 9, 7, eos])], pad_id=eos)
    assert mb.start == 2
    assert mb.input_ids.tolist() == [[1, 2, 3, 7, eos, eos, eos], [eos, eos, 4, 8, 9, 7, eos]]
    assert mb.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]  # both stop tokens count
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]


def test_step_indices_cover_each_epoch_and_depend_only_on_step():
    first_epoch = [i for s in range(5) for i in step_indices(20, 4, s, seed=3)]
    assert sorted(first_epoch) == list(range(20))
    assert step_indices(20, 4, 7, seed=3) == step_indices(20, 4, 7, seed=3)
    assert step_indices(20, 4, 7, seed=3) != step_indices(20, 4, 7, seed=4)


def test_grpo_learns_a_synthetic_reward():
    """Reward = fraction of completion tokens equal to TARGET. A sign error anywhere makes the reward fall."""
    TARGET, V, G = 3, 16, 8
    torch.manual_seed(0)
    model = Qwen2(ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2))
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    _, _, cfg = make_case()
    cfg.lr, cfg.temperature, cfg.grad_clip, cfg.max_response_len = 3e-3, 1.0, 1.0, 8
    opt, sched = make_optimizer(model, cfg, cfg.lr, 100)
    prompts = [[1, 2], [4, 5, 6], [7], [8, 9]]
    history = []
    for step in range(30):
        s = generate(model, prompts, num_samples=G, max_new_tokens=8, temperature=1.0, seed=step, progress=False)
        rewards = torch.tensor([sum(t == TARGET for t in toks) / len(toks) for toks in s.tokens])
        history.append(rewards.mean().item())
        adv, _ = group_advantages(rewards, G, cfg.grpo)
        seqs = [Sequence(prompts[p], s.tokens[j], s.logprobs[j], float(adv[j])) for j, p in enumerate(s.prompt_index)]
        mbs = microbatches(seqs, 16, 0, "cpu")
        norm = loss_norm([mb.mask for mb in mbs], cfg.max_response_len)
        model.train()
        loss, _ = train_on_micro_batches(model, mbs, norm, cfg, Dist(), contextlib.nullcontext(), V, sft=False)
        optimizer_step(model, opt, sched, cfg, loss)
    early, late = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert early < 0.2 and late > early + 0.3, history
