"""The pictures of a run: reward.png (GRPO reward, total and per component) and ex.png (held-out EX), by step.

matplotlib is optional (`pip install -e '.[plots]'`): without it the pictures are skipped with one line.
"""

from __future__ import annotations

from pathlib import Path

from sqlr1.run import read_evals, read_records


def plot_run(run_dir: Path) -> None:
    """reward.png and ex.png in run_dir, from its metrics.jsonl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e '.[plots]')")
        return
    grpo = [r for r in read_records(run_dir) if r["stage"] == "grpo"]
    if grpo:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in grpo]
        for key in ("reward", "reward_format", "reward_execution", "reward_result", "reward_length"):
            ax.plot(steps, [r[key] for r in grpo], label=key, lw=2 if key == "reward" else 1)
        ax.set(xlabel="step", ylabel="mean reward", title="GRPO reward")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / "reward.png", dpi=120)
        plt.close(fig)
    evals = read_evals(run_dir)
    if evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in evals]
        ax.plot(steps, [r["ex_greedy"] for r in evals], "o-", label="EX greedy")
        voted = [r for r in evals if "ex_voted" in r]  # eval_vote="final": intermediate evaluations are greedy only
        ax.plot([r["step"] for r in voted], [r["ex_voted"] for r in voted], "s-", label="EX voted")
        ax.set(xlabel="step", ylabel="held-out execution accuracy", ylim=(0, 1), title="Held-out EX")
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "ex.png", dpi=120)
        plt.close(fig)
    if grpo or evals:
        print(f"plots: {run_dir / 'reward.png'}, {run_dir / 'ex.png'}")
