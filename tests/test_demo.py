"""The toy demo, shortened: `train.py` on a small toy world, SFT then GRPO through the real sandbox, in ~100 s.

The full demo (`python train.py --config configs/grpo_tiny.py`, ~8.5 minutes) is measured in benchmarks/RESULTS.md.
This is its smoke-and-direction check: the same command line on a 4-database world with 100 SFT and 30 GRPO steps
must finish and write its run directory, and GRPO must raise the training reward (mean of the second half of the
steps above the first: 0.28 -> 0.67 here) without lowering held-out EX. With the advantage sign flipped
(`A_i = -(r_i - mean) / std`) the same run's reward collapses to -1.0 (-0.02 -> -1.00 over the last ten steps) and
this test fails, as it must (checked by hand, see RESULTS.md).
"""

import json
import subprocess
import sys
from pathlib import Path

from sqlr1.toyworld import build_toyworld

ROOT = Path(__file__).resolve().parents[1]


def test_short_demo_grpo_raises_training_reward_and_keeps_held_out_ex(tmp_path):
    world = build_toyworld(tmp_path / "world", seed=0, num_train_dbs=4, num_dev_dbs=1, dev_questions_per_db=20)
    run = tmp_path / "run"
    cmd = [
        sys.executable, "train.py", "--config", "configs/grpo_tiny.py", f"--data_root={world}", f"--out_dir={run}",
        "--sft_steps=100", "--grpo_steps=30", "--eval_n=1",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "EX greedy" in out.stdout and (run / "final" / "config.json").is_file()

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    grpo = [r["reward"] for r in records if r["stage"] == "grpo"]
    evals = {r["stage"]: r for r in records if r["stage"].startswith("eval:")}
    assert len(grpo) == 30 and set(evals) == {"eval:sft", "eval:grpo"}
    first, second = sum(grpo[:15]) / 15, sum(grpo[15:]) / 15
    assert second > first, grpo
    assert evals["eval:grpo"]["ex_greedy"] >= evals["eval:sft"]["ex_greedy"], evals
