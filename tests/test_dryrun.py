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


def test_fake_run_matches_real_gloo_run(tmp_path):
    """Every phase's peak per rank under fake tensors + a fake group of 2 is within 15 % of the real 2-rank run."""
    out = tmp_path / "real.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
         str(ROOT / "tests" / "dryrun_worker.py"), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = json.loads(out.read_text())
    with fake_world(WORLD) as mesh:
        fake = simulate(CONFIG, MODEL, VOCAB, WORLD, plan(), mesh, fake=True)
    assert set(fake) == set(real) == {"build", "eval greedy", "eval voted", "rollout", "reference", "old logp",
                                      "update", "optimizer", "checkpoint"}
    for phase in fake:
        f, r = fake[phase]["total"], real[phase]["total"]
        assert r > 2**20, (phase, r)  # big enough to be above allocator noise
        assert abs(f - r) <= 0.15 * r, f"{phase}: fake {f / GiB:.4f} GiB vs real {r / GiB:.4f} GiB"


def test_checkpoint_save_gathers_one_parameter_at_a_time(tmp_path):
    """2 gloo ranks: no rank holds the full fp32 model while saving (it did: every rank gathered all of it), and
    the HF export is byte-identical to saving the full state dict cast to bf16."""
    out = tmp_path / "peaks.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "ckpt_worker.py"), str(tmp_path / "run"), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
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
