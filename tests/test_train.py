"""The training loop's machinery: split invariance (micro-batches and FSDP ranks), updates, learning, NaN guard."""

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from types import SimpleNamespace

from sqlr1.batch import TrainSequence, collate
from sqlr1.distributed import Dist, Models
from sqlr1.grpo import group_advantages
from sqlr1.model import ModelConfig, Qwen2
from sqlr1.sampling import SamplingParams, generate
from sqlr1.update import new_optimizer, policy_update
from tests.split_case import LOSS_MODES, SYNC_SHARED, make_case, one_step
from train import step_indices

TOKENIZER = SimpleNamespace(vocab_size=61, pad_id=0)  # what the update reads of a tokenizer

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


def test_fsdp_two_ranks_match_one_process_and_hold_no_unsharded_gradient(tmp_path, torchrun):
    """torchrun, gloo, FSDP2 fully_shard: 2 ranks x 2 micro-batches == 1 process x 1 micro-batch, with gradient
    sync after every micro-batch (grad_accum_no_sync=False, the default), with no-sync until the last one, and with
    shared-prefix micro-batches (the shared forward methods registered with FSDP).

    With sync, FSDP2 holds no unsharded gradient after micro-batch 0 (only the sharded DTensor .grad); with no-sync
    it holds the whole fp32 model's worth (the ~28 GiB per GPU at 7B this default avoids)."""
    out = tmp_path / "dist.pt"
    torchrun("dist_split.py", str(out))
    dist_results = torch.load(out)
    for mode in LOSS_MODES:
        model, seqs, cfg = make_case(mode)
        g1, p1 = one_step(model, seqs, cfg, Dist(), micro_batch_size=len(seqs))
        for no_sync, shared in SYNC_SHARED:
            g2, p2 = dist_results[mode, no_sync, shared]
            assert_same(g1, g2, atol=1e-6)
            assert_same(p1, p2, atol=1e-6)
    held, full_fp32, sharded = dist_results["held", False]
    assert held == 0 and sharded, (held, full_fp32)
    held, full_fp32, _ = dist_results["held", True]
    assert held == full_fp32 > 0  # the probe sees what no-sync keeps: every parameter's fp32 gradient, unsharded


def test_every_parameter_changes_and_reference_does_not():
    model, seqs, cfg = make_case()
    cfg.grpo.kl_coef, cfg.recompute_old_logp, cfg.micro_batch_size = 0.05, False, 4
    ref = Qwen2(model.config)
    ref.load_state_dict(model.state_dict())
    ref.requires_grad_(False)
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = policy_update(Models(model, ref, model, contextlib.nullcontext()), new_optimizer(model, cfg, "grpo"), seqs,
                          TOKENIZER, cfg, Dist())
    assert stats["skipped"] == 0 and stats["grad_norm"] > 0 and stats["kl_ref"] == 0.0  # ref == policy so far
    unchanged = [k for k, v in model.state_dict().items() if torch.equal(v, before[k])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    assert all(torch.equal(v, ref_before[k]) for k, v in ref.state_dict().items())


def test_non_finite_step_is_skipped():
    model, seqs, cfg = make_case()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seqs[0].advantage = float("nan")
    stats = policy_update(Models(model, None, model, contextlib.nullcontext()), new_optimizer(model, cfg, "grpo"),
                          seqs, TOKENIZER, cfg, Dist())
    assert stats["skipped"] == 1 and not math.isfinite(stats["grad_norm"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_collate_uses_explicit_completion_mask_even_when_pad_is_eos():
    eos = 5  # a base model: pad id == EOS id
    mb = collate([TrainSequence([1, 2, 3], [7, eos]), TrainSequence([4], [8, 9, 7, eos])], pad_id=eos)
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
    cfg.lr, cfg.temperature, cfg.grad_clip, cfg.max_response_len, cfg.micro_batch_size = 3e-3, 1.0, 1.0, 8, 16
    optimizer = new_optimizer(model, cfg, "grpo")
    models = Models(model, None, model, contextlib.nullcontext())
    prompts = [[1, 2], [4, 5, 6], [7], [8, 9]]
    history = []
    for step in range(30):
        s = generate(model, prompts, G, SamplingParams(max_new_tokens=8, temperature=1.0, seed=step), progress=False)
        rewards = torch.tensor([sum(t == TARGET for t in toks) / len(toks) for toks in s.tokens])
        history.append(rewards.mean().item())
        adv, _ = group_advantages(rewards, G, cfg.grpo)
        seqs = [TrainSequence(prompts[p], s.tokens[j], advantage=float(adv[j]), sampler_logp=s.logprobs[j])
                for j, p in enumerate(s.prompt_index)]
        model.train()
        policy_update(models, optimizer, seqs, SimpleNamespace(vocab_size=V, pad_id=0), cfg, Dist())
    early, late = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert early < 0.2 and late > early + 0.3, history


def _bf16_rollout_case(recompute: bool, ratio_level: str = "token", fused: bool = False):
    """Train as train.py does in one bf16 process: fp32 policy under bf16 autocast, a bf16 rollout copy samples.
    pi_old from the trainer: fused (ppo_epochs = 1, the update's own forward detached) or a no-grad forward before
    two passes (lr 0, so both passes see the rollout's weights)."""
    V, G = 61, 4
    torch.manual_seed(0)
    policy = Qwen2(ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2))
    policy.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    rollout = Qwen2(policy.config).to(torch.bfloat16)
    rollout.load_state_dict(policy.state_dict())
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    s = generate(rollout, prompts, G, SamplingParams(max_new_tokens=10, temperature=1.1, vocab_size=V, seed=0),
                 progress=False)
    _, _, cfg = make_case()
    cfg.temperature, cfg.recompute_old_logp, cfg.lr, cfg.micro_batch_size = 1.1, recompute, 0.0, 4
    cfg.ppo_epochs = 1 if fused or not recompute else 2
    cfg.grpo.ratio_level = ratio_level
    if ratio_level == "sequence":  # GSPO's clip range
        cfg.grpo.clip_low, cfg.grpo.clip_high = 3e-4, 4e-4
    seqs = [TrainSequence(prompts[p], s.tokens[j], advantage=(-1.0) ** j, sampler_logp=s.logprobs[j])
            for j, p in enumerate(s.prompt_index)]
    models = Models(policy, None, rollout, torch.autocast("cpu", dtype=torch.bfloat16))
    return policy_update(models, new_optimizer(policy, cfg, "grpo"), seqs, SimpleNamespace(vocab_size=V, pad_id=0), cfg,
                         Dist())


@pytest.mark.parametrize("fused", [False, True], ids=["extra-forward", "detached-at-ppo1"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_recomputed_old_logp_gives_ratio_exactly_one_before_the_update(ratio_level, fused):
    """bf16 autocast, one process: pi_old from the trainer's own forward (a no-grad forward before the update, or at
    ppo_epochs=1 the update's forward detached) -> rho == 1, nothing clipped by numerics; the bf16 sampler's
    log-probs as pi_old (recompute_old_logp=False) give rho != 1. The mismatch is what gets logged."""
    fixed = _bf16_rollout_case(recompute=True, ratio_level=ratio_level, fused=fused)
    assert fixed["ratio"] == 1.0 and fixed["kl_old"] == 0.0
    assert fixed["clip_low"] == 0.0 and fixed["clip_high"] == 0.0
    sampler = _bf16_rollout_case(recompute=False, ratio_level=ratio_level)
    assert sampler["kl_old"] > 1e-6 and "mismatch_abs_log_rho" not in sampler  # the bf16 sampler as pi_old
    assert fixed["mismatch_abs_log_rho"] > 1e-3  # logged: how far the sampler is from the trainer
    if ratio_level == "sequence":  # with the sampler as pi_old, GSPO would clip sequences by numerics alone
        assert sampler["clip_low"] + sampler["clip_high"] > 0 and fixed["mismatch_clip_frac_seqs"] > 0


def test_tis_needs_recomputed_old_logp_and_defaults_are_the_bounded_safe_ones():
    from sqlr1.config import TrainConfig, load_config
    from sqlr1.grpo import GRPOConfig

    with pytest.raises(ValueError, match="recompute_old_logp"):
        TrainConfig(recompute_old_logp=False, grpo=GRPOConfig(tis_cap=2.0))
    TrainConfig(grpo=GRPOConfig(tis_cap=2.0))
    assert TrainConfig().recompute_old_logp and not TrainConfig().grad_accum_no_sync
    big = load_config(ROOT / "configs" / "grpo_7b.py")
    assert big.recompute_old_logp and not big.grad_accum_no_sync


def test_step_without_varied_rewards_is_skipped_and_counted(tmp_path):
    """DAPO filter on an untrained model: every completion has the wrong format (reward -1), so no group varies.
    The run must skip those steps (no optimizer step, counted in the record) instead of crashing in loss_norm."""
    from sqlr1.checkpoint import load_model
    from sqlr1.toyworld import build_toyworld

    world = build_toyworld(tmp_path / "world", seed=0, num_train_dbs=2, num_dev_dbs=1, train_questions_per_db=4,
                           dev_questions_per_db=2)
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "grpo_tiny.py"),
           f"--data_root={world}", f"--out_dir={run}", "--sft_steps=0", "--grpo_steps=2", "--eval_split=",
           "--prompts_per_step=2", "--group_size=4", "--micro_batch_size=4", "--max_response_len=12",
           "--sandbox_workers=1", "--grpo.drop_zero_std_groups=true"]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in records if r["stage"] == "grpo"]
    assert [r["reward"] for r in grpo] == [-1.0, -1.0] and [r["frac_zero_std"] for r in grpo] == [1.0, 1.0]
    assert [r["skipped_zero_var"] for r in grpo] == [1, 1] and [r["skipped_zero_var_total"] for r in grpo] == [1, 2]
    assert all("loss" not in r for r in grpo)  # nothing was trained, so there is no loss to report
    initial, final = load_model(world / "model_seed0"), load_model(run / "final")
    assert all(torch.equal(a, b) for a, b in zip(initial.state_dict().values(), final.state_dict().values()))


def test_rl_filter_runs_on_rank_zero_and_every_rank_gets_its_list(tmp_path, torchrun):
    """torchrun, 2 gloo ranks, the helper train.py calls: both ranks hold rank 0's list though rank 1's own filter
    keeps a different one, and each rank's sandbox gets cores // LOCAL_WORLD_SIZE workers (at least 1)."""
    import json

    out = tmp_path / "filter.json"
    torchrun("dist_filter.py", str(out))
    rank0, rank1 = json.loads(out.read_text())
    assert rank0["own"] == [0, 1] and rank1["own"] == [1]  # left alone, the ranks would disagree
    assert rank0["shared"] == rank1["shared"] == [0, 1]
    for r in (rank0, rank1):
        assert r["local_world_size"] == 2 and r["workers"] == max(1, r["cores"] // 2)


def test_sandbox_share_of_the_node(monkeypatch):
    from sqlr1.distributed import cores_per_local_rank

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cores_per_local_rank() == cores  # one process: all cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cores_per_local_rank() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))
    assert cores_per_local_rank() == 1  # never zero workers


def test_rollouts_and_evaluations_decode_compiled_when_asked(tmp_path, compiled_graphs, capfd):
    """compile="auto" is on for CUDA and off for CPU; "true" compiles the decode step of the rollouts (sampled) and
    of the held-out evaluation (greedy, and sampled for voting), each graph's one-time cost logged. Graphs are
    built by a backend that runs them as captured (no inductor: seconds, not minutes)."""
    import train
    from sqlr1.config import TrainConfig
    from sqlr1.toyworld import build_toyworld

    assert TrainConfig().compile_decode(torch.device("cuda")) and not TrainConfig().compile_decode(torch.device("cpu"))
    world = build_toyworld(tmp_path / "world", seed=0, num_train_dbs=2, num_dev_dbs=1, train_questions_per_db=4,
                           dev_questions_per_db=2)
    code = train.main(["--config", str(ROOT / "configs" / "grpo_tiny.py"), f"--data_root={world}",
                       f"--out_dir={tmp_path / 'run'}", "--sft_steps=0", "--grpo_steps=1", "--eval_n=2",
                       "--prompts_per_step=2", "--group_size=2", "--max_response_len=12", "--sandbox_workers=1",
                       "--compile=true"])
    assert code == 0
    err = capfd.readouterr().err
    assert "torch.compile: decode step (greedy) ready in" in err
    assert "torch.compile: decode step (sampled, top_k=0, top_p=1) ready in" in err
    assert 2 <= len(compiled_graphs) <= 3, len(compiled_graphs)  # greedy and sampled (one dynamic re-trace at most)
