"""The dry run (sqlr1/dryrun.py): its fake-tensor peaks against the same tracker on a real gloo run; bad requests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqlr1.checkpoint import save_state_dict
from sqlr1.dryrun import GiB, fake_world, simulate
from tests.dryrun_case import CONFIG, MODEL, VOCAB, WORLD, checkpoint_model, plan

ROOT = Path(__file__).resolve().parents[1]


def test_fake_run_matches_real_gloo_run(tmp_path, torchrun):
    """Every phase's peak per rank under fake tensors + a fake group of 2 is within 15 % of the real 2-rank run."""
    out = tmp_path / "real.json"
    torchrun("dryrun_worker.py", str(out), nproc=WORLD)
    real = json.loads(out.read_text())
    with fake_world(WORLD) as mesh:
        fake = simulate(CONFIG, MODEL, VOCAB, WORLD, plan(), mesh, fake=True)
    assert set(fake) == set(real) == {"build", "eval greedy", "eval voted", "rollout", "reference", "old logp",
                                      "update", "optimizer", "checkpoint"}
    for phase in fake:
        f, r = fake[phase]["total"], real[phase]["total"]
        assert r > 2**20, (phase, r)  # big enough to be above allocator noise
        assert abs(f - r) <= 0.15 * r, f"{phase}: fake {f / GiB:.4f} GiB vs real {r / GiB:.4f} GiB"


def test_the_dry_run_measures_train_pys_own_phases(monkeypatch):
    """The dry run calls the code train.py runs, not a copy: a phase made to hold 64 MiB more is reported 64 MiB
    larger, and the other phases are not."""
    from sqlr1 import update

    with fake_world(WORLD) as mesh:
        before = simulate(CONFIG, MODEL, VOCAB, WORLD, plan(), mesh)
        real = update.accumulate_gradients

        def heavier(*args, **kwargs):
            extra = torch.empty(64 * 2**20, dtype=torch.uint8)  # alive for the whole forward/backward loop
            out = real(*args, **kwargs)
            del extra
            return out

        monkeypatch.setattr(update, "accumulate_gradients", heavier)
        after = simulate(CONFIG, MODEL, VOCAB, WORLD, plan(), mesh)
    assert after["update"]["total"] - before["update"]["total"] == 64 * 2**20
    assert all(after[p] == before[p] for p in before if p != "update")


def test_checkpoint_save_gathers_one_parameter_at_a_time(tmp_path, torchrun):
    """2 gloo ranks: no rank holds the full fp32 model while saving (it did: every rank gathered all of it), and
    the HF export is byte-identical to saving the full state dict cast to bf16."""
    out = tmp_path / "peaks.json"
    torchrun("ckpt_worker.py", str(tmp_path / "run"), str(out))
    res = json.loads(out.read_text())
    # a CPU run: rank 0's host copy in bf16 (half the fp32 model) shares the device here; rank 1 keeps nothing
    assert res["peaks"][1] < 0.25 * res["full_bytes"], res
    assert res["peaks"][0] < 0.75 * res["full_bytes"], res
    model = checkpoint_model()
    expected = save_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, model.config,
                               tmp_path / "expected")
    saved = tmp_path / "run" / "checkpoints" / "step_000001" / "model"
    names = sorted(p.name for p in expected.iterdir())
    assert names == sorted(p.name for p in saved.iterdir())
    for name in names:
        assert (expected / name).read_bytes() == (saved / name).read_bytes(), name


def test_rollout_copy_is_freed_between_uses_and_refilled():
    """free_weights releases the copy's storage (it lived through the policy update before); copy_full_weights
    allocates it again with the policy's weights."""
    from sqlr1 import distributed

    policy, copy = checkpoint_model(), checkpoint_model().to(torch.bfloat16)
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(2.0)
    distributed.free_weights(copy)
    assert all(p.untyped_storage().nbytes() == 0 for p in copy.parameters())
    distributed.copy_full_weights(policy, copy)
    for (name, p), q in zip(policy.named_parameters(), copy.parameters()):
        assert torch.equal(p.to(torch.bfloat16), q), name


def test_rollout_copy_refresh_gathers_bf16_shards(tmp_path, torchrun):
    """2 gloo ranks, FSDP2: the bf16 rollout copy of an fp32 policy is bit for bit the policy gathered in fp32 and
    then cast, while the refresh all-gathers bf16 shards: half the bytes of the fp32 model."""
    out = tmp_path / "copy.json"
    torchrun("dist_copy.py", str(out))
    res = json.loads(out.read_text())
    assert res["same"]
    assert res["gathered"] <= 0.5 * res["full_fp32"] * 1.01, res  # shards padded to equal sizes: ~1 % slack


@pytest.mark.parametrize("args, message", [
    (["--gpus=0"], "--gpus=0"),
    (["--gpus=3"], "not divisible"),
    (["--gpu_mem_gb=-5"], "--gpu_mem_gb=-5"),
    (["--gpu_mem_gb=nan"], "--gpu_mem_gb=nan"),
    (["--model=Someone/Unknown-7B"], "Qwen/Qwen2.5-Coder-7B-Instruct"),
])
def test_bad_dry_run_request_is_one_line(args, message):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "grpo_7b.py"),
                           "--dry_run", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr[-2000:]


def test_config_that_fits_at_no_micro_batch_is_one_error_line(tmp_path):
    """A GPU that holds the weights, the rollout and the optimizer step but not the update at micro-batch 1: the
    table, then one `error:` line naming micro_batch_size=1 (the memory is chosen from the dry run's own rows)."""
    from sqlr1.config import TrainConfig
    from sqlr1.dryrun import Plan

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}))
    settings = dict(model=str(model_dir), dtype="bfloat16", eval_split="", max_prompt_len=16, max_response_len=3000,
                    prompts_per_step=2, group_size=2, micro_batch_size=2, grpo_steps=1)
    from sqlr1.dryrun import model_shape

    mc, vocab = model_shape(str(model_dir))
    with fake_world(2) as mesh:
        rows = simulate(TrainConfig(**settings), mc, vocab, 2, Plan(micro_batch_size=1, eval_batch=0), mesh)
    others = max(r["total"] for p, r in rows.items() if p not in ("reference", "update"))
    assert rows["update"]["total"] > 1.2 * others  # the update is what does not fit
    gpu_mem = (others + rows["update"]["total"]) / 2 / 0.9 / GiB
    config = tmp_path / "cfg.py"
    config.write_text("from sqlr1.config import TrainConfig\nconfig = TrainConfig(**%r)\n" % settings)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config), "--dry_run", "--gpus=2",
                           f"--gpu_mem_gb={gpu_mem}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "| update |" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "micro_batch_size=1" in errors[0], proc.stderr[-2000:]


def test_streamed_save_writes_the_same_shards(tmp_path):
    """save_state_dict(stream=...) (tensors arriving one at a time, state_dict only shapes) == the plain save."""
    model = checkpoint_model()
    full = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    plain = save_state_dict(full, model.config, tmp_path / "plain", max_shard_size=40_000)
    shapes = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in full.items()}
    streamed = save_state_dict(shapes, model.config, tmp_path / "streamed", max_shard_size=40_000,
                               stream=iter(full.items()))
    names = sorted(p.name for p in plain.iterdir())
    assert len(names) > 4 and names == sorted(p.name for p in streamed.iterdir())  # several shards + index
    for name in names:
        assert (plain / name).read_bytes() == (streamed / name).read_bytes(), name
