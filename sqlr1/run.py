"""The run directory: resumable checkpoints of the whole training state, metrics logs, and the `Run` train.py drives.

    <out_dir>/config.json, config_changes.jsonl   the resolved config; the settings each --resume changed
    <out_dir>/train.lock                          flock held by the training process (records its PID)
    <out_dir>/metrics.jsonl, samples.jsonl        one line per step / per logged completion
    <out_dir>/checkpoints/step_000100/            model/ (HF layout: sample.py, transformers, vLLM read it),
                                                  state/ (torch.distributed.checkpoint: fp32 weights + AdamW, sharded),
                                                  rng_rank<r>.pt, trainer.json (step, stage, schedule)
    <out_dir>/checkpoints/latest                  name of the newest complete checkpoint
    <out_dir>/final/                              the final model (HF layout)

Nothing of a run is ever lost to another: a checkpoint is written under a temporary name and renamed when complete
(a crash or a full disk leaves the previous one), a directory holding a run's files is reused only by --resume, and
a resume writes nothing (config, logs) until its checkpoint has loaded. With keep_last = N only the newest N
complete checkpoints stay. final/ may hold the user's files next to the model: promoting replaces only model files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
import shlex
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)
from tqdm.auto import tqdm

from sqlr1 import distributed
from sqlr1.checkpoint import SourceExtras, read_json, save_state_dict
from sqlr1.config import TrainConfig, config_dict, save_config
from sqlr1.distributed import Dist
from sqlr1.model import Qwen2

# a single process saving and loading a distributed checkpoint is how every CPU run works: no warning per save
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

RUN_FILES = ("config.json", "metrics.jsonl", "samples.jsonl", "final", "checkpoints")  # any of them: a run lives here


def make_run_dir(out_dir: str, name: str) -> Path:
    """`out_dir` or runs/<name>-<timestamp> (the timestamp is agreed by all ranks)."""
    if not out_dir:
        out_dir = f"runs/{name}-{distributed.broadcast_object(time.strftime('%Y%m%d-%H%M%S'))}"
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_files(run_dir: Path) -> list[str]:
    """The files of a training run in run_dir (a fresh run must not start there: it would overwrite them)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


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


def save_checkpoint(run_dir: Path, step: int, model: Qwen2, optimizer, trainer: dict, tokenizer, d: Dist,
                    hf_dtype: torch.dtype, model_files: dict[str, dict] | None = None,
                    source: SourceExtras | None = None) -> Path:
    """Collective: every rank calls it. Writes checkpoints/step_<step>/ atomically (the HF export in `hf_dtype`) and
    updates `latest`; a write that fails (a full disk) removes the partial save and is one ValueError, the previous
    checkpoint kept."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
        torch.save(rng_state(), tmp / f"rng_rank{d.rank}.pt")
        # HF export: one parameter gathered at a time (a collective: every rank walks the stream), kept on rank 0's
        # host only until its shard file is written; no rank holds the full model (the dry run prices this)
        gathered = distributed.gather_full_params(model, hf_dtype)
        try:
            if d.is_main:
                shapes = {n: torch.empty(p.shape, dtype=hf_dtype, device="meta") for n, p in model.named_parameters()}
                save_state_dict(shapes, model.config, tmp / "model", tokenizer=tokenizer, source=source, stream=gathered)
        finally:  # every rank joins every gather, even when rank 0's write failed part-way (else the others hang)
            for _ in gathered:
                pass
        if d.is_main:
            for name, content in (model_files or {}).items():  # e.g. the prompt settings sample.py should reuse
                (tmp / "model" / name).write_text(json.dumps(content, indent=2) + "\n")
            (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2) + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(run_dir)
        kept = f"{last.name} is kept" if last else "no earlier checkpoint exists"
        then = "free disk space, then continue with --resume" if e.errno == errno.ENOSPC else "continue with --resume"
        raise ValueError(f"saving checkpoint {final.name} in {root} failed: {e.strerror or e} (the partial save was "
                         f"removed; {kept}); {then}") from None
    distributed.barrier()
    if d.is_main:
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


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoints/step_N directories with their trainer.json (a finished save), oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step_*")
                  if p.is_dir() and not p.name.endswith(".tmp") and (p / "trainer.json").is_file())


def checkpoint_problem(path: Path, rank: int) -> str | None:
    """What is missing or broken in a checkpoint, from its files alone (None: it looks intact)."""
    state = path / "state"
    if not (state / ".metadata").is_file():
        return f"{state / '.metadata'} is missing"
    if not any(state.glob("*.distcp")):
        return f"{state} holds no *.distcp file"
    rng = path / f"rng_rank{rank}.pt"
    if not rng.is_file():
        return f"{rng} is missing (resume with the number of ranks the run was saved with)"
    return None


def load_checkpoint(path: Path, model: Qwen2, optimizer, d: Dist) -> None:
    """Restore weights, the optimizer (unless None: a new stage starts a new optimizer) and this rank's RNG. A damaged
    checkpoint is one ValueError naming it and the newest intact one before it."""
    problem = checkpoint_problem(path, d.rank)
    try:
        if problem is None:
            if optimizer is None:
                state = {"model": get_model_state_dict(model)}
                dcp.load(state, checkpoint_id=str(path / "state"))
                set_model_state_dict(model, state["model"])
            else:
                model_sd, optim_sd = get_state_dict(model, optimizer.adamw)
                state = {"model": model_sd, "optim": optim_sd}
                dcp.load(state, checkpoint_id=str(path / "state"))
                set_state_dict(model, optimizer.adamw, model_state_dict=state["model"], optim_state_dict=state["optim"])
            set_rng_state(torch.load(path / f"rng_rank{d.rank}.pt", weights_only=False))
    except (Exception, CheckpointException) as e:  # truncated files: torch raises from deep inside its readers
        problem = f"its files are truncated or corrupt ({str(e).splitlines()[0].split('. ')[0][:160]})"
    if problem is not None:
        older = [p for p in complete_checkpoints(path.parent.parent) if p.name < path.name]
        then = f"resume from the one before it: --resume={older[-1]}" if older else "no earlier checkpoint exists"
        raise ValueError(f"checkpoint {path} is damaged: {problem}; {then}")


def resume_checkpoint(resume: str, out_dir: str) -> tuple[Path, Path]:
    """(checkpoint directory, run directory) that `--resume[=resume]` names; nothing is created.

    "latest": the newest checkpoint of out_dir (when `latest` names a missing one, the newest complete one, said on
    stderr). A path: that checkpoint, in out_dir or else in the run that holds it."""
    if resume == "latest":
        run_dir = Path(out_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"--resume: --out_dir={out_dir} does not exist, so there is no run to continue; "
                                    "drop --resume to start one there")
        ckpt, complete = latest_checkpoint(run_dir), complete_checkpoints(run_dir)
        if ckpt is None and complete:
            ckpt = complete[-1]
            print(f"resume: checkpoints/latest does not name a checkpoint on disk; continuing from {ckpt.name}, the "
                  "newest complete one", file=sys.stderr)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: {run_dir / 'checkpoints'} holds no complete checkpoint (save_every=0 "
                                    f"saves only at the end); this run cannot continue: start a new one in another "
                                    "--out_dir")
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
    """Delete all but the newest `keep_last` complete checkpoints (0: keep all), never the one `latest` names;
    called after a save completed, so the newest is on disk first. Returns the deleted paths."""
    if keep_last <= 0:
        return []
    steps = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    doomed = [p for p in steps if p not in set(steps[-keep_last:]) | {latest_checkpoint(run_dir)}]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def _is_model_file(name: str) -> bool:
    """A file a checkpoint export writes (see checkpoint.save_state_dict and Run.save's model_files)."""
    return re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json", name) is not None or (
        name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "sqlr1_prompt.json"))


def promote_final(model_dir: Path, final: Path) -> None:
    """<out_dir>/final <- the last checkpoint's HF model (hard links: no copy of the weights). Only model files are
    replaced, each linked under a temporary name and renamed over the old one (atomic per file); model files of the
    old final/ that the new model lacks (shards of another layout) are removed; anything else stays."""
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


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records, in order ([] when there are none)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def read_evals(run_dir: Path) -> list[dict]:
    """The evaluation records of metrics.jsonl, in order."""
    return [r for r in read_records(run_dir) if r.get("stage", "").startswith("eval:")]


def last_logged_step(run_dir: Path) -> int:
    """The number of the last SFT or GRPO step metrics.jsonl records (0: none)."""
    steps = [r["step"] for r in read_records(run_dir) if r.get("stage") in ("sft", "grpo")]
    return steps[-1] if steps else 0


def _keep_until(path: Path, step: int) -> None:
    """A log's lines of steps <= step (a resume re-runs the later ones)."""
    if path.exists():
        kept = [x for x in path.read_text().splitlines() if x and json.loads(x).get("step", -1) <= step]
        path.write_text("".join(x + "\n" for x in kept))


TOTALS = ("skipped_zero_var",)  # step metrics also logged as running totals over the run, resumes included


@dataclass
class Run:
    """A training run as train.py drives it: where it lives, which rank this is, the checkpoint it continues from
    (None: a fresh run) and what the main rank writes (metrics, samples, checkpoints, final/)."""

    cfg: TrainConfig
    dir: Path
    dist: Dist
    resume_from: Path | None = None
    state: dict = field(default_factory=lambda: {"step": 0, "stage": None})  # the checkpoint's trainer.json
    changes: dict = field(default_factory=dict)  # settings the resume changes: recorded once it has loaded
    source: SourceExtras | None = None  # what every exported model keeps of the starting model
    started: bool = False
    bad_steps: int = 0
    bar: tqdm | None = None
    wandb: object = None

    @property
    def start_step(self) -> int:
        return self.state["step"]

    def start(self, policy: Qwen2, optimizer) -> None:
        """Before the run's first step. A resumed run loads its checkpoint: the weights, RNG and, within its stage,
        AdamW and the schedule; only then is its record updated (config.json, config_changes.jsonl, the logs cut
        back to the checkpoint's step), so a checkpoint that fails to load changes nothing."""
        if self.started:
            return
        self.started = True
        if self.resume_from is not None:
            same_stage = self.state["stage"] == optimizer.stage
            load_checkpoint(self.resume_from, policy, optimizer if same_stage else None, self.dist)
            if same_stage:
                optimizer.schedule.load_state_dict(self.state["scheduler"])
        self.bar = tqdm(total=self.cfg.sft_steps + self.cfg.grpo_steps, initial=self.start_step, desc="train",
                        disable=not self.dist.is_main, dynamic_ncols=True)
        if not self.dist.is_main:
            return
        if self.changes:
            with (self.dir / "config_changes.jsonl").open("a") as f:
                f.write(json.dumps({"step": self.start_step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                    "changes": self.changes}) + "\n")
            print("resume: changed " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in self.changes.items())
                  + f" (recorded in {self.dir / 'config_changes.jsonl'})")
        save_config(self.cfg, self.dir / "config.json")
        if self.resume_from is not None:
            for name in ("metrics.jsonl", "samples.jsonl"):
                _keep_until(self.dir / name, self.start_step)
        if self.cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                print("wandb_project is set but wandb is not installed (pip install wandb); logging to files only")
            else:
                self.wandb = wandb.init(project=self.cfg.wandb_project, name=self.dir.name,
                                        config=config_dict(self.cfg), resume="allow")

    def log(self, record: dict, samples: list[dict] = ()) -> None:
        """A record to metrics.jsonl (a step's with its running totals), samples to samples.jsonl; a step moves the
        progress bar and stops the run after max_bad_steps consecutive steps with a non-finite loss or gradient."""
        for key in TOTALS:
            if key in record:
                self.state[key] = record[f"{key}_total"] = self.state.get(key, 0) + record[key]
        if self.dist.is_main:
            for name, lines in (("metrics.jsonl", [record]), ("samples.jsonl", samples)):
                if lines:
                    with (self.dir / name).open("a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in lines)
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
        if record["stage"].startswith("eval:"):
            if self.dist.is_main:
                tqdm.write(f"eval after {record['stage'][5:]} (step {record['step']}): "
                           + " ".join(f"{k}={v:.3f}" for k, v in record.items() if k.startswith(("ex_", "format",
                                                                                                  "mean_"))))
            return
        self.bar.update(1)
        keys = ("loss", "reward", "accuracy", "grad_norm") if record["stage"] == "grpo" else ("loss", "grad_norm")
        self.bar.set_postfix_str(" ".join(f"{k}={record[k]:.3g}" for k in keys if k in record))
        self.bad_steps = self.bad_steps + 1 if record["skipped"] else 0
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise RuntimeError(f"{self.bad_steps} consecutive steps had a non-finite loss or gradient norm (last: step "
                               f"{record['step']}); lower the learning rate or check the data — see "
                               f"{self.dir / 'metrics.jsonl'}")

    def save(self, step: int, policy: Qwen2, optimizer, tokenizer, hf_dtype: torch.dtype) -> None:
        """A checkpoint after `step` (every rank), then the oldest pruned past keep_last."""
        cfg = self.cfg
        trainer = {"step": step, "stage": optimizer.stage, "scheduler": optimizer.schedule.state_dict(),
                   **{k: self.state.get(k, 0) for k in TOTALS}}
        save_checkpoint(self.dir, step, policy, optimizer.adamw, trainer, tokenizer, self.dist, hf_dtype, model_files={
            "sqlr1_prompt.json": {"template": cfg.prompt_template, "sample_values": cfg.sample_values}},
            source=self.source)
        if self.dist.is_main:
            prune_checkpoints(self.dir, cfg.keep_last)

    def finish(self, example=None) -> None:
        """final/ from the last checkpoint, the table of evaluations, the plots, and a sample.py command that asks
        the final model `example` (a held-out question)."""
        if self.bar is not None:
            self.bar.close()
        if not self.dist.is_main:
            return
        from sqlr1.plots import plot_run

        last = latest_checkpoint(self.dir)
        if last is not None:
            promote_final(last / "model", self.dir / "final")
        print_summary(read_evals(self.dir))
        plot_run(self.dir)
        print(f"run directory: {self.dir}  final model: {self.dir / 'final'}")
        if example is not None and (self.dir / "final").is_dir():
            print("ask the final model a held-out question:\n  "
                  + sample_command(self.dir / "final", example, self.cfg.max_response_len))


class Phases:
    """Seconds per phase of a step (`with phases("rollout"): ...`, nested phases included) and, on CUDA, each phase's
    peak of allocated memory (torch.cuda.max_memory_allocated, GiB): the numbers the dry run predicts."""

    def __init__(self, device: torch.device):
        self.seconds, self.peak, self.cuda, self._open = {}, {}, device.type == "cuda", []

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.time()
        if self.cuda:  # the counter restarts per phase; an enclosing phase takes the max of its children
            self._open.append(0)
            torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.time() - t0
            if self.cuda:
                peak = max(torch.cuda.max_memory_allocated(), self._open.pop())
                self.peak[phase] = max(self.peak.get(phase, 0), peak)
                if self._open:
                    self._open[-1] = max(self._open[-1], peak)

    def peaks(self) -> dict[str, float]:
        return {f"peak_mem_{k.replace(' ', '_')}_gib": v / 2**30 for k, v in self.peak.items()}


def print_summary(evals: list[dict]) -> None:
    """The final table: one row per evaluation."""
    if not evals:
        return
    print(f"\n{'stage':<16} {'step':>5} {'EX greedy':>10} {'EX voted':>9} {'format ok':>10} {'mean reward':>12}")
    for e in evals:
        voted = f"{e['ex_voted']:>9.3f}" if "ex_voted" in e else f"{'-':>9}"  # eval_vote="final": greedy only
        print(f"{e['stage'].removeprefix('eval:'):<16} {e['step']:>5} {e['ex_greedy']:>10.3f} {voted} "
              f"{e['format_ok']:>10.3f} {e['mean_reward']:>12.3f}")


def sample_command(model_dir: Path, example, max_new_tokens: int) -> str:
    """A ready-to-run `sample.py` command line (quoted for a POSIX shell) asking `model_dir` one question."""
    def path(p) -> str:  # relative to the working directory when inside it, like the rest of the run's paths
        p = Path(p).absolute()
        return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)

    words = [path(sys.executable), path(Path(__file__).parents[1] / "sample.py"), "--model", str(model_dir),
             "--db", str(example.db_path), "--question", example.question]
    if example.evidence:
        words += ["--evidence", example.evidence]
    return shlex.join(words + ["--max_new_tokens", str(max_new_tokens)])
