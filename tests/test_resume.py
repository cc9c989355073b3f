"""Kill a CPU training run after a checkpoint, resume it, and compare with an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("time", "tokens_per_s")  # wall-clock fields differ between runs


def command(world: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "grpo_tiny.py"),
            f"--data_root={world}", f"--out_dir={out}", "--sft_steps=2", "--grpo_steps=3", "--save_every=1",
            "--eval_split=", "--sft_batch_size=4", "--prompts_per_step=2", "--group_size=4", "--micro_batch_size=4",
            "--max_response_len=24", "--sandbox_workers=1", *extra]


def metrics(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in records]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from sqlr1.toyworld import ensure_toyworld

    return ensure_toyworld(tmp_path_factory.mktemp("toy") / "world")


def test_killed_and_resumed_run_reproduces_uninterrupted_run(world, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(command(world, tmp_path / "a"), env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    proc = subprocess.Popen(command(world, tmp_path / "b"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = tmp_path / "b" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.exists() and latest.read_text() >= "step_000002") and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: somewhere after the second checkpoint
    proc.wait()
    killed_at = latest.read_text().strip()
    assert killed_at != "step_000005", "the run finished before it could be killed"

    resumed = subprocess.run(command(world, tmp_path / "b", "--resume"), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["step"], k)
            else:
                assert rb[k] == ra[k], (ra["step"], k)
    assert (tmp_path / "b" / "final" / "config.json").is_file()
    again = subprocess.run(command(world, tmp_path / "b"), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "already holds a training run" in again.stderr  # never overwrite a run
    assert not list((tmp_path / "b" / "checkpoints").glob("*.tmp"))
