"""How train.py starts and ends: its command line, the run directory it claims, Ctrl-C / SIGTERM and errors.

    python train.py --config FILE [--key=value ...] [--out_dir=DIR] [--resume[=CHECKPOINT]] [--dry_run ...]

`main` checks everything a run needs before it writes a byte (the settings, the checkpoint to resume and whether it
may change them, the run directory: one holding a run is reused only by --resume), locks the directory, calls the
recipe (`train(cfg, run)`), and turns what can go wrong into one line: bad input ("error: ..."), an interrupt
("interrupted after step N of T (...); continue with: <the command>", exit 130), or, with several ranks, a failure
of one rank, which ends that rank at once so torchrun stops the others (`distributed.exit_on_error`).
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from sqlr1 import distributed
from sqlr1.checkpoint import read_json, source_extras
from sqlr1.config import TrainConfig, load_config, resume_changes
from sqlr1.run import (
    Run, last_logged_step, latest_checkpoint, lock_run_dir, make_run_dir, read_trainer_state,
    remove_partial_checkpoints, resume_checkpoint, run_files,
)

BAD_INPUT = (FileNotFoundError, FileExistsError, ValueError)


def parse_args(argv: list[str], description: str) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="Python file defining `config = TrainConfig(...)`")
    ap.add_argument("--resume", nargs="?", const="latest", default=None,
                    help="continue from the newest checkpoint of --out_dir (or from the checkpoint directory given)")
    ap.add_argument("--dry_run", action="store_true",
                    help="simulate one step at full scale on this CPU (fake tensors): memory per phase per GPU")
    ap.add_argument("--gpus", type=int, default=8, help="--dry_run: number of GPUs (ranks) to simulate")
    ap.add_argument("--gpu_mem_gb", type=float, default=80.0, help="--dry_run: memory of one GPU, GiB")
    ap.add_argument("--dry_run_out", default="", help="--dry_run: also write the table to this markdown file")
    return ap.parse_known_args(argv)


def main(argv: list[str], train: Callable[[TrainConfig, Run], None], description: str = "") -> int:
    """train.py's entry point: 0 when the run finished, 130 when interrupted (errors raise, or end this rank)."""
    args, overrides = parse_args(argv, description)
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        return dry_run(cfg, args)
    stopped_by = {}

    def stop(signum, frame):  # SIGTERM ends a run the way Ctrl-C does: where it stopped, how to continue
        stopped_by["signal"] = signal.Signals(signum).name
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    d = distributed.setup(cfg.device, cfg.dist_timeout)
    run, lock = None, None
    try:
        run, lock = claim(cfg, args.resume, d)
        train(run.cfg, run)
    except KeyboardInterrupt:
        if d.is_main:
            print(interrupted(argv, run, d.world_size, stopped_by.get("signal")), file=sys.stderr)
        return 130
    except Exception as e:
        if d.world_size == 1:
            raise
        distributed.exit_on_error(d, failure_message(e))  # at once: the other ranks may wait in a collective
    finally:
        if lock is not None:
            lock.close()
        signal.signal(signal.SIGTERM, previous)
    distributed.cleanup()
    return 0


def claim(cfg: TrainConfig, resume: str | None, d: distributed.Dist):
    """The Run to train and the lock on its directory, after every check; nothing is written but the lock (the run's
    config and logs are written when its first step starts: `Run.start`)."""
    if cfg.prompts_per_step % d.world_size:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the number of ranks {d.world_size}")
    if cfg.sft_steps == 0 and cfg.grpo_steps == 0:
        raise ValueError("sft_steps=0 and grpo_steps=0: nothing to train; set one of them (to evaluate a model: "
                         "sample.py --model DIR --dataset ...)")
    if resume == "latest" and not cfg.out_dir:
        raise ValueError("--resume needs --out_dir=<run directory> (or --resume=<checkpoint directory>)")
    toy = cfg.dataset == "toy"
    if toy:
        from sqlr1.toyworld import prepare, resolve_config

        cfg = resolve_config(cfg)
    ckpt, state, changes, out_dir = None, {"step": 0, "stage": None}, {}, cfg.out_dir
    if resume:  # the checkpoint and the settings it may continue with are checked before anything is written
        ckpt, run_path = resume_checkpoint(resume, cfg.out_dir)
        out_dir, state = str(run_path), read_trainer_state(ckpt)
        saved = ckpt.parent.parent / "config.json"  # the run that wrote the checkpoint
        if saved.is_file():
            changes = resume_changes(read_json(saved), cfg, state["step"], state["stage"], saved)
        elif d.is_main:
            print(f"resume: no config.json next to {ckpt.parent}; the settings were not compared with the run's")
    if toy:  # the main rank builds the toy world, the others wait, then everyone reads it
        if d.is_main:
            prepare(cfg)
        distributed.barrier()
    run_dir = make_run_dir(out_dir, cfg.name)
    cfg = replace(cfg, out_dir=str(run_dir))  # config.json names the directory a resume must give
    lock = lock_run_dir(run_dir) if d.is_main else None  # held until this process ends
    if d.is_main:
        remove_partial_checkpoints(run_dir)  # a save a kill interrupted: only the lock holder may clean it
    distributed.barrier()
    if not resume and (files := run_files(run_dir)):
        if lock is not None:
            lock.close()
        raise ValueError(f"{run_dir} already holds a training run ({', '.join(files)}): continue it with --resume, or "
                         "pick a new --out_dir")
    return Run(cfg, run_dir, d, ckpt, state, changes, source_extras(cfg.model)), lock


def interrupted(argv: list[str], run: Run | None, world_size: int, signal_name: str | None) -> str:
    """The one line an interrupt ends with: where the run stopped, and the command that continues it."""
    if run is None:
        return "\ninterrupted during start-up, before any training step"
    if run.bar is not None:
        run.bar.close()  # its last line before ours
    removed = [p.name for p in remove_partial_checkpoints(run.dir)]
    last, done = latest_checkpoint(run.dir), last_logged_step(run.dir)
    where = f"after step {done} of {run.cfg.sft_steps + run.cfg.grpo_steps}" if done else "before the first step"
    saved = f"the last checkpoint is {last.name}" if last else "no checkpoint was saved"
    if removed:
        saved += f"; the unfinished {', '.join(removed)} was removed"
    how = "interrupted" if signal_name is None else f"stopped by {signal_name}"
    if last is None:
        return (f"\n{how} {where} ({saved}); nothing to resume: start over in a new directory with: "
                f"{rerun_command(argv, None, world_size)}")
    return f"\n{how} {where} ({saved}); continue with: {rerun_command(argv, run.dir, world_size)}"


def rerun_command(argv: list[str], run_dir: Path | None, world_size: int) -> str:
    """This command line with --out_dir=<run_dir> --resume (run_dir None: neither, a new directory)."""
    keep = []
    for i, a in enumerate(argv):
        resume_dir = i > 0 and argv[i - 1] == "--resume" and not a.startswith("-")  # `--resume DIR`
        if not (a == "--resume" or a.startswith(("--resume=", "--out_dir=")) or resume_dir):
            keep.append(a)
    launcher = ["torchrun", f"--nproc_per_node={world_size}"] if world_size > 1 else ["python"]
    tail = [f"--out_dir={run_dir}", "--resume"] if run_dir is not None else []
    return shlex.join([*launcher, sys.argv[0], *keep, *tail])


def failure_message(e: Exception) -> str:
    """One line for bad input, one line when another rank's failure broke a collective, else the traceback."""
    if isinstance(e, BAD_INPUT):
        return f"error: {e}"
    if isinstance(e, torch.distributed.DistError) or "by peer" in str(e):  # NCCL / gloo: a peer process is gone
        return "stopped: another rank failed (its error is printed above)"
    return "".join(traceback.format_exception(e))


def dry_run(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """Print (and optionally write) the dry run's table; exit code 1 when the peak does not fit."""
    from sqlr1 import dryrun

    dryrun.check_request(cfg, args.gpus, args.gpu_mem_gb)  # before anything is built
    if cfg.dataset == "toy":  # the toy model's shape is read from its config.json: build the world first
        from sqlr1.toyworld import prepare, resolve_config

        cfg = resolve_config(cfg)
        prepare(cfg)
    report = dryrun.dry_run(cfg, args.gpus, args.gpu_mem_gb, log=lambda msg: print(f"dry run: {msg}", file=sys.stderr))
    text = report.markdown(f"dry run: {cfg.name} ({cfg.model}) on {args.gpus} x {args.gpu_mem_gb:g} GiB")
    print(text)
    if args.dry_run_out:
        Path(args.dry_run_out).write_text(text)
    if report.problem:
        raise ValueError(report.problem)
    return 0 if report.fits else 1
