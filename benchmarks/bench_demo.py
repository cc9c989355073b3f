"""The README's first command, end to end, before and after a change of its settings: where the wait goes.

    python benchmarks/bench_demo.py                      # seed 0: the previous defaults, then configs/grpo_tiny.py
    python benchmarks/bench_demo.py --seeds 0 1 2        # both settings on each seed, one run at a time
    python benchmarks/bench_demo.py --seeds 0 1 2 --before_seeds 0   # the before settings on seed 0 only
    python benchmarks/bench_demo.py --keep runs/bench    # keep the run directories (their metrics and plots)

Each run is `train.py --config configs/grpo_tiny.py --seed=S` in a fresh process (a quiet machine: nothing else
running), timed from start to exit; "before" adds BEFORE's overrides. Prints per run the wall time and its stages
from metrics.jsonl (SFT steps, evaluations, the GRPO phases; "other": start-up, data, checkpoints, plots), the
held-out greedy EX after SFT and after GRPO, and the ratio before / after of each time, with the CPU it ran on.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlr1.run import read_records  # noqa: E402

# grpo_tiny's settings before its EX curve and its longer training: 600 SFT and 100 GRPO steps, voted evaluations
# after SFT and after GRPO, none between
BEFORE = ["--sft_steps=600", "--grpo_steps=100", "--eval_every=0", "--eval_vote=always"]
COLUMNS = ("wall", "sft", "eval", "rollout", "reward", "update", "other")


def cpu_model() -> str:
    """The CPU's name and whether it has AVX-512 and AMX (bf16 and fp32 speeds differ most between such CPUs)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown CPU")
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines() if line.startswith("flags")), set())
    return f"{name} ({', '.join(f for f in ('avx512f', 'amx_tile') if f in flags) or 'no AVX-512'})"


def run(seed: int, overrides: list[str], out_dir: Path) -> dict:
    """One demo run: its seconds per stage and its held-out greedy EX after SFT and after GRPO."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/grpo_tiny.py"), f"--seed={seed}",
           f"--out_dir={out_dir}", *overrides]
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    records = read_records(out_dir)
    sft = [r for r in records if r["stage"] == "sft"]
    grpo = [r for r in records if r["stage"] == "grpo"]
    evals = [r for r in records if r["stage"].startswith("eval:")]
    out = {"wall": wall, "sft": sum(r["time"] for r in sft), "eval": sum(r["time"] for r in evals),
           **{k: sum(r[f"time_{k2}"] for r in grpo) for k, k2 in (("rollout", "rollout"), ("reward", "reward"),
                                                                     ("update", "train"))},
           "sft_steps": len(sft), "evals": len(evals),
           "ex_sft": next(e["ex_greedy"] for e in evals if e["stage"] == "eval:sft"), "ex_grpo": evals[-1]["ex_greedy"]}
    out["other"] = wall - sum(out[k] for k in ("sft", "eval", "rollout", "reward", "update"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--before_seeds", type=int, nargs="*", help="seeds that also run the before settings (default: all)")
    ap.add_argument("--before", nargs="*", default=BEFORE, help="overrides giving the settings to compare against")
    ap.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary folder)")
    args = ap.parse_args()
    before_seeds = args.seeds if args.before_seeds is None else args.before_seeds
    print(f"{cpu_model()}; before = {' '.join(args.before)}; after = configs/grpo_tiny.py as shipped", flush=True)
    rows = {}  # (seed, label) -> numbers
    with tempfile.TemporaryDirectory(prefix="bench_demo-") as tmp:
        for seed in args.seeds:
            for label, overrides in (("before", args.before), ("after", [])):
                if label == "after" or seed in before_seeds:
                    rows[seed, label] = run(seed, overrides, (args.keep or Path(tmp)) / f"{label}-{seed}")
                    print(f"seed {seed} {label}: {rows[seed, label]['wall']:.0f} s", file=sys.stderr, flush=True)
    print(f"{'seed':>4} {'run':<7}" + "".join(f"{c + ' s':>10}" for c in COLUMNS) +
          f"{'SFT steps':>10}{'evals':>6}  EX greedy SFT -> GRPO (gain)")
    for (seed, label), r in rows.items():
        print(f"{seed:>4} {label:<7}" + "".join(f"{r[c]:>10.1f}" for c in COLUMNS) +
              f"{r['sft_steps']:>10}{r['evals']:>6}  {r['ex_sft']:.3f} -> {r['ex_grpo']:.3f} "
              f"({100 * (r['ex_grpo'] - r['ex_sft']):+.1f})")
        if label == "after" and (seed, "before") in rows:
            before = rows[seed, "before"]
            print(f"{seed:>4} {'ratio':<7}" + "".join(f"{before[c] / r[c] if r[c] > 0 else float('nan'):>9.2f}x"
                                                     for c in COLUMNS))


if __name__ == "__main__":
    main()
