"""The pictures of a run and of a lab: did it learn, and when.

run.png: SFT loss | GRPO reward | held-out EX (greedy through GRPO, voted where measured), against the run's step,
the SFT -> GRPO boundary marked. grpo.png: the reward's components, accuracy and completion length during GRPO.
lab.png: each variant's held-out EX and reward against GRPO step (mean over seeds, band min..max) and its paired
gain over SFT with the 95 % interval.
Noisy per-step series are drawn faint with a debiased exponential moving average over them (as TensorBoard does:
s_t = (a s_{t-1} + (1 - a) x_t), divided by 1 - a^t). matplotlib is optional (`pip install -e '.[plots]'`).
"""

from __future__ import annotations

from pathlib import Path

from sqlr1.run import read_evals, read_records

COMPONENTS = (("reward_format", "format S_f"), ("reward_execution", "execution S_e"), ("reward_result", "result S_r"),
              ("reward_length", "length S_l"), ("accuracy", "accuracy (result right)"),
              ("completion_len_mean", "completion length (tokens)"))


def smooth(xs: list[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average of a series."""
    out, s = [], 0.0
    for t, x in enumerate(xs, 1):
        s = weight * s + (1 - weight) * x
        out.append(s / (1 - weight**t))
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _trend(ax, steps: list[int], values: list[float], color: str, label: str | None = None) -> None:
    """A noisy series: faint as it is, its smoothed trend over it."""
    ax.plot(steps, values, color=color, alpha=0.25, lw=0.8)
    ax.plot(steps, smooth(values), color=color, lw=1.8, label=label)


def plot_run(run_dir: Path) -> list[Path]:
    """run.png and, after GRPO steps, grpo.png in run_dir from its metrics.jsonl; the files written."""
    plt = _pyplot()
    if plt is None:
        print("plots skipped: matplotlib is not installed (pip install -e '.[plots]')")
        return []
    records = read_records(run_dir)
    sft = [r for r in records if r["stage"] == "sft"]
    grpo = [r for r in records if r["stage"] == "grpo"]
    evals = read_evals(run_dir)
    if not (sft or grpo):
        return []
    boundary = sft[-1]["step"] if sft and grpo else None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panels = (("SFT loss (cross-entropy per token, log scale)", sft, "loss", "tab:purple"),
              ("GRPO mean reward", grpo, "reward", "tab:blue"))
    for ax, (title, rows, key, color) in zip(axes, panels):
        ax.set_title(title)
        if rows:
            _trend(ax, [r["step"] for r in rows], [r[key] for r in rows], color)
        else:
            ax.text(0.5, 0.5, "no steps", ha="center", va="center", transform=ax.transAxes, color="gray")
    if sft and min(r["loss"] for r in sft) > 0:
        axes[0].set_yscale("log")  # the plateau and the drop after it show; on a linear axis the first steps dominate
    ax = axes[2]
    ax.set_title("held-out execution accuracy")
    ax.plot([e["step"] for e in evals], [e["ex_greedy"] for e in evals], "o-", color="tab:green", ms=4, label="greedy")
    voted = [e for e in evals if "ex_voted" in e]
    ax.plot([e["step"] for e in voted], [e["ex_voted"] for e in voted], "s", color="tab:orange", ms=6,
            label=f"voted ({len(voted)} evaluation{'s' * (len(voted) != 1)})")
    for e in (evals[:1] + evals[-1:] if len(evals) > 1 else evals):  # the first and last greedy EX, written out
        ax.annotate(f"{e['ex_greedy']:.2f}", (e["step"], e["ex_greedy"]), textcoords="offset points", xytext=(0, 7),
                    ha="center", fontsize=8, color="tab:green")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
        if boundary is not None:
            ax.axvline(boundary + 0.5, color="gray", ls="--", lw=0.8)
            ax.text(boundary + 0.5, 1.0, " GRPO ->", transform=ax.get_xaxis_transform(), fontsize=7, color="gray",
                    va="top")
    fig.tight_layout()
    written = [run_dir / "run.png"]
    fig.savefig(written[0], dpi=110)
    plt.close(fig)
    if grpo:
        fig, axes = plt.subplots(2, 3, figsize=(12, 5.6))
        steps = [r["step"] for r in grpo]
        for ax, (key, title), color in zip(axes.flat, COMPONENTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            _trend(ax, steps, [r[key] for r in grpo], color)
            ax.set(title=title, xlabel="step")
        fig.suptitle("GRPO: the reward's components, accuracy and length (smoothed over the raw steps)", fontsize=10)
        fig.tight_layout()
        written.append(run_dir / "grpo.png")
        fig.savefig(written[1], dpi=110)
        plt.close(fig)
    print("plots: " + ", ".join(str(p) for p in written))
    return written


def plot_lab(results: dict, path: Path, interval) -> bool:
    """lab.png from the lab's results {variant: {seed: numbers}}; interval(xs) -> (mean, half-width or None)."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, (ax_ex, ax_reward, ax_gain) = plt.subplots(1, 3, figsize=(14, 4.6), gridspec_kw={"width_ratios": [4, 4, 3]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, per_seed) in enumerate(results.items()):
        color, style = colors[i % len(colors)], ("-", "--", ":")[i // len(colors) % 3]  # rows past 10: other lines
        curves = [dict(map(tuple, v["ex_curve"])) for v in per_seed.values()]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        ys = [[c[s] for c in curves] for s in steps]
        ax_ex.plot(steps, [sum(y) / len(y) for y in ys], style, marker="o", ms=3, color=color, label=name)
        ax_ex.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.12)
        rewards = [smooth(v["reward_curve"]) for v in per_seed.values()]
        n = min(len(r) for r in rewards)
        cols = [[r[t] for r in rewards] for t in range(n)]
        ax_reward.plot(range(1, n + 1), [sum(c) / len(c) for c in cols], style, color=color)
        ax_reward.fill_between(range(1, n + 1), [min(c) for c in cols], [max(c) for c in cols], color=color, alpha=0.12)
        mean, half = interval([v["ex_greedy"] - v["sft_ex_greedy"] for v in per_seed.values()])
        ax_gain.errorbar(mean, -i, xerr=half or 0, fmt="o", color=color, capsize=3)
    ax_ex.set(xlabel="GRPO step", ylabel="held-out greedy EX", title="held-out EX (mean over seeds, band min..max)")
    ax_reward.set(xlabel="GRPO step", ylabel="training reward (smoothed)",
                  title="training reward (each row's own reward scale)")
    ax_gain.set(title="gain over SFT (greedy EX, 95 % CI)", yticks=[-i for i in range(len(results))],
                yticklabels=list(results))
    ax_gain.axvline(0, color="gray", lw=0.8)
    ax_ex.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
