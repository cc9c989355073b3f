"""The run directory: resumable checkpoints of the whole training state, and metrics logs.

    <out_dir>/config.json                      the resolved config
    <out_dir>/metrics.jsonl, samples.jsonl     one line per step / per logged completion
    <out_dir>/checkpoints/step_000100/
        model/                                 HF layout (config.json + safetensors + tokenizer): sample.py,
                                               transformers and vLLM read it
        state/                                 torch.distributed.checkpoint of fp32 weights + optimizer (sharded)
        rng_rank<r>.pt                         every rank's RNG states
        trainer.json                           step, stage, data position
    <out_dir>/checkpoints/latest               name of the newest complete checkpoint
    <out_dir>/final/                           the final model (HF layout)

Every checkpoint is written under a temporary name and renamed when complete, so a crash at any moment leaves
either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)

from sqlr1 import distributed
from sqlr1.checkpoint import save_state_dict
from sqlr1.model import Qwen2


def make_run_dir(out_dir: str, name: str) -> Path:
    """`out_dir` or runs/<name>-<timestamp> (the timestamp is agreed by all ranks)."""
    if not out_dir:
        stamp = distributed.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
        out_dir = f"runs/{name}-{stamp}"
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path, step: int, model: Qwen2, optimizer: torch.optim.Optimizer, trainer: dict, tokenizer, dist_info,
    hf_dtype: torch.dtype, model_files: dict[str, dict] | None = None,
) -> Path:
    """Collective: every rank calls it. Writes checkpoints/step_<step>/ atomically and updates `latest`."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    if dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
    torch.save(rng_state(), tmp / f"rng_rank{dist_info.rank}.pt")
    # HF export: one parameter gathered at a time (a collective: every rank walks the stream), cast, and kept on
    # rank 0's host only until its shard file is written; no rank holds the full model (the dry run prices this)
    gathered = distributed.gather_full_params(model, hf_dtype)
    if not dist_info.is_main:
        for _ in gathered:
            pass
    else:
        shapes = {name: torch.empty(p.shape, dtype=hf_dtype, device="meta") for name, p in model.named_parameters()}
        save_state_dict(shapes, model.config, tmp / "model", tokenizer=tokenizer, stream=gathered)
        for name, content in (model_files or {}).items():  # e.g. the prompt settings sample.py should reuse
            (tmp / "model" / name).write_text(json.dumps(content, indent=2) + "\n")
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2) + "\n")
    distributed.barrier()
    if dist_info.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write(root / "latest", final.name)
    distributed.barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, model: Qwen2, optimizer: torch.optim.Optimizer | None, dist_info) -> None:
    """Restore weights, the optimizer (unless None: a new stage starts a new optimizer) and this rank's RNG."""
    if not (path / "state").is_dir():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no state/ directory); pass checkpoints/step_N")
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(path / "state"))
        set_model_state_dict(model, state["model"])
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "state"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{dist_info.rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} missing: resume with the same number of ranks the run was saved with")
    set_rng_state(torch.load(rng_file, weights_only=False))


def promote_final(model_dir: Path, final: Path) -> None:
    """<out_dir>/final <- the last checkpoint's HF model (hard links: no copy of the weights), atomically."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp, copy_function=os.link)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsLog:
    """metrics.jsonl / samples.jsonl writer (main rank only), optionally mirrored to wandb."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None, wandb_project: str = "", config=None):
        self.enabled = enabled
        self.metrics_path, self.samples_path = run_dir / "metrics.jsonl", run_dir / "samples.jsonl"
        self.wandb = None
        if not enabled:
            return
        for path in (self.metrics_path, self.samples_path):
            _truncate_after(path, resume_step)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("wandb_project is set but wandb is not installed (pip install wandb); logging to files only")
            else:
                self.wandb = wandb.init(project=wandb_project, name=run_dir.name, config=config, resume="allow")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def samples(self, records: list[dict]) -> None:
        if not self.enabled or not records:
            return
        with self.samples_path.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


def _truncate_after(path: Path, step: int | None) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be re-run); a fresh run starts empty."""
    if not path.exists():
        return
    if step is None:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", -1) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_evals(run_dir: Path) -> list[dict]:
    """The evaluation records of metrics.jsonl, in order."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in records if r.get("stage", "").startswith("eval:")]


def plot_metrics(run_dir: Path) -> None:
    """reward.png (total and per component) and ex.png (held-out EX) against step, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e '.[plots]')")
        return
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    grpo = [r for r in records if r["stage"] == "grpo"]
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
        ax.plot(steps, [r["ex_voted"] for r in evals], "s-", label="EX voted")
        ax.set(xlabel="step", ylabel="held-out execution accuracy", ylim=(0, 1), title="Held-out EX")
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "ex.png", dpi=120)
        plt.close(fig)
    print(f"plots: {run_dir / 'reward.png'}, {run_dir / 'ex.png'}")
