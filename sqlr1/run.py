"""The run directory: resumable checkpoints of the whole training state, and metrics logs.

    <out_dir>/config.json                      the resolved config
    <out_dir>/config_changes.jsonl             settings a --resume changed (step, key: [old, new]), one line each
    <out_dir>/train.lock                       flock held by the training process (records its PID)
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
either the previous checkpoint or the new one, never half of one. With keep_last = N only the newest N complete
checkpoints stay (pruned after the new one is complete; the one `latest` names is never deleted). final/ may hold
the user's files next to the model (sample.py's evaluations): promoting a new final model replaces only model files.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
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
from sqlr1.checkpoint import SourceExtras, read_json, save_state_dict
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
    hf_dtype: torch.dtype, model_files: dict[str, dict] | None = None, source: SourceExtras | None = None,
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
    try:
        if dist_info.is_main:
            shapes = {name: torch.empty(p.shape, dtype=hf_dtype, device="meta") for name, p in model.named_parameters()}
            save_state_dict(shapes, model.config, tmp / "model", tokenizer=tokenizer, source=source,
                            stream=gathered)
    finally:  # every rank joins every gather, even when rank 0's write failed part-way (else the others hang)
        for _ in gathered:
            pass
    if dist_info.is_main:
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


def resume_checkpoint(resume: str, out_dir: str) -> tuple[Path, Path]:
    """(checkpoint directory, run directory) that `--resume[=resume]` names; nothing is created.

    "latest": the newest checkpoint of out_dir. A path: that checkpoint, in out_dir or else in the run that holds it.
    """
    if resume == "latest":
        run_dir = Path(out_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"--resume: --out_dir={out_dir} does not exist, so there is no run to continue; "
                                    "drop --resume to start one there")
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint found under {run_dir / 'checkpoints'} (the run saved "
                                    "none yet: save_every=0 saves only at the end); rerun without --resume to "
                                    "start over")
        return ckpt, run_dir
    ckpt = Path(resume)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"--resume={resume}: no such checkpoint directory")
    if not (ckpt / "trainer.json").is_file() or not (ckpt / "state").is_dir():
        if (ckpt / "config.json").is_file():
            why = "is a model (HF layout, like a run's final/), not a training checkpoint"
        elif (ckpt / "checkpoints").is_dir():
            why = f"is a run directory; continue it with --out_dir={resume} --resume"
        else:
            why = "is not a training checkpoint (no trainer.json and state/)"
        raise FileNotFoundError(f"--resume={resume} {why}: pass <run>/checkpoints/step_N, or --out_dir=<run> --resume")
    if out_dir:
        return ckpt, Path(out_dir)
    if ckpt.parent.name != "checkpoints":
        raise ValueError(f"--resume={resume}: not inside a run's checkpoints/; say where to continue with --out_dir")
    return ckpt, ckpt.parent.parent


def read_trainer_state(ckpt: Path) -> dict:
    """trainer.json of a checkpoint: step, stage, scheduler state."""
    state = read_json(ckpt / "trainer.json")
    if not isinstance(state.get("step"), int) or state.get("stage") not in ("sft", "grpo"):
        raise ValueError(f"{ckpt / 'trainer.json'}: expected an integer step and stage sft or grpo; the checkpoint "
                         "is damaged: resume from an earlier one")
    return state


def record_config_changes(run_dir: Path, step: int, changes: dict[str, list]) -> None:
    """Append the settings a resume changed, with the step it resumed at, to config_changes.jsonl."""
    with (run_dir / "config_changes.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": changes}) + "\n")


def lock_run_dir(run_dir: Path):
    """Hold an exclusive flock on <run_dir>/train.lock for the life of the process; refuse if another holds it.

    The kernel drops the lock when the process exits however it exits (crash, SIGKILL), so no stale lock remains.
    Returns the open lock file: keep a reference to it as long as the run goes on.
    """
    path = run_dir / "train.lock"
    f = path.open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ValueError(f"{run_dir} is in use by another training process (PID {holder}, holding {path}); wait "
                         "for it to end or stop it, then rerun") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Delete checkpoints/*.tmp (a save that was interrupted); the lock holder's to call. Returns what it removed."""
    partial = sorted((run_dir / "checkpoints").glob("*.tmp"))
    for p in partial:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return partial


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (0: keep all) and never the one `latest` names.

    Called after a save completed, so the newest checkpoint is always on disk first. Returns the deleted paths.
    """
    if keep_last <= 0:
        return []
    steps = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    keep = set(steps[-keep_last:]) | {latest_checkpoint(run_dir)}
    doomed = [p for p in steps if p not in keep]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def _is_model_file(name: str) -> bool:
    """A file a checkpoint export writes (see checkpoint.save_state_dict and train.py's model_files)."""
    return re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json", name) is not None or (
        name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "sqlr1_prompt.json"))


def promote_final(model_dir: Path, final: Path) -> None:
    """<out_dir>/final <- the last checkpoint's HF model (hard links: no copy of the weights).

    Only model files are replaced: anything else in final/ (sample.py's eval_*/ folders, the user's notes) stays.
    Each file is linked under a temporary name and renamed over the old one (atomic per file); model files of the
    old final/ that the new model lacks (shards of another layout) are removed.
    """
    final.mkdir(exist_ok=True)
    new = sorted(p.name for p in model_dir.iterdir() if p.is_file())
    for name in new:
        tmp = final / f".{name}.promoting"
        tmp.unlink(missing_ok=True)
        os.link(model_dir / name, tmp)
        os.replace(tmp, final / name)
    for p in final.iterdir():
        if p.is_file() and _is_model_file(p.name) and p.name not in new:
            p.unlink()


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


def last_logged_step(run_dir: Path) -> int:
    """The number of the last SFT or GRPO step metrics.jsonl records (0: none)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    steps = [r["step"] for r in map(json.loads, filter(None, lines)) if r.get("stage") in ("sft", "grpo")]
    return steps[-1] if steps else 0


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
        voted = [r for r in evals if "ex_voted" in r]  # eval_vote="final": intermediate evaluations are greedy only
        ax.plot([r["step"] for r in voted], [r["ex_voted"] for r in voted], "s-", label="EX voted")
        ax.set(xlabel="step", ylabel="held-out execution accuracy", ylim=(0, 1), title="Held-out EX")
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "ex.png", dpi=120)
        plt.close(fig)
    print(f"plots: {run_dir / 'reward.png'}, {run_dir / 'ex.png'}")
