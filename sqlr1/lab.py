"""The RL lab: named variants x seeds of a run config, SFT once per seed (cached), paired gains with 95 % CIs.

    python -m sqlr1.lab --config configs/lab_toy.py [--jobs=2] [--out_dir=runs/lab] [--seeds=0,1]

For each seed s the SFT stage (the base config with grpo_steps=0) runs once, in cache_dir/sft-<key>; every variant's
GRPO stage for that seed starts from its final/ weights (`--model=<final> --sft_steps=0`), so variants are compared
paired by seed. Each run is a `train.py` subprocess (its own process group, its log in <run dir>/train.log). Re-running
the same command continues: a run with final/ and its last evaluation recorded is kept, an unfinished one is removed
and restarted; a finished GRPO run whose command line has changed since (an edited variant, a new SFT) runs again
(each run directory keeps its command line in lab_run.json). Ctrl-C ends every child's process group; the same
command continues. Written after every finished run: OUT/lab.json, OUT/lab.md (the table) and OUT/lab.png.

Labs never remove each other's runs: the lab holds OUT/lab.lock for its whole life (a second lab on OUT is refused,
naming the first one's PID), and claims each SFT run of the shared cache (cache_dir/.sft-<key>.lock) before it checks,
removes or starts it, so a lab (or sft_checkpoint) that needs an SFT run another one is making waits for it, then uses
it. A cached SFT run whose final/ model is damaged (unreadable config.json, tokenizer or weights missing, weights
truncated) is run again.
--config and base are looked up from the current folder, then from the repository, so a lab started elsewhere finds
configs/...; out_dir, cache_dir and the run configs' paths (data_root) are relative to the current folder.

Statistics over the n seeds of a variant: mean +- t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation
(Student's t); with n = 1 no interval is given. The gain over SFT is paired: d_s = EX_grpo(s) - EX_sft(s), then the
same interval over the d_s.

The SFT cache key is a short hash of the resolved SFT run config as a dict, the seed included, minus the fields that
cannot change what SFT computes or how its end-of-SFT evaluation (the "SFT" row) scores: SFT_EXCLUDED below (the
GRPO-only fields, and where/how fast/how verbose the run is), plus, for the toy world, a hash of the world's JSON
files (its manifest toyworld.json and the question/trace files), so a rebuilt world invalidates the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from safetensors import safe_open
from tqdm.auto import tqdm

from sqlr1.checkpoint import _weight_files, read_json
from sqlr1.config import _flat, config_dict, load_config, set_field
from sqlr1.run import lock_run_dir, read_evals

ROOT = Path(__file__).resolve().parents[1]  # the repository: configs/... are found from anywhere
TRAIN_PY = ROOT / "train.py"

# Run-config fields the lab sets itself (neither base_overrides nor a variant may).
LAB_CONTROLLED = ("seed", "model", "out_dir", "eval_init")

# Fields that do not enter the SFT cache key: GRPO-only settings (SFT runs with grpo_steps=0) and settings that
# decide where, how fast or how verbosely a run goes, never what its SFT steps or end-of-SFT evaluation compute.
# The reward's mode and timeout stay in the key (they decide the evaluation's EX); its weights/switches do not.
SFT_EXCLUDED = frozenset({
    "name", "out_dir", "grpo_steps", "prompts_per_step", "group_size", "grad_accum_no_sync", "shared_prefix",
    "recompute_old_logp", "ppo_epochs", "lr", "temperature", "top_p", "top_k", "eval_every", "eval_init",
    "eval_vote", "sandbox_workers", "save_every", "keep_last", "log_samples", "wandb_project", "compile",
    "max_bad_steps", "drop_empty_gold", "query_cost", "dist_timeout",
})
SFT_EXCLUDED_GROUPS = ("grpo.", "reward.")
SFT_KEPT_IN_GROUPS = frozenset({"reward.mode", "reward.timeout"})


@dataclass
class LabConfig:
    name: str = "lab"
    base: str = "configs/grpo_tiny.py"  # the run config every run starts from
    base_overrides: list[str] = field(default_factory=list)  # lab-wide --key=value for every run (SFT included)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: dict[str, list[str]] = field(default_factory=lambda: {"grpo": []})  # name -> train.py overrides
    out_dir: str = ""  # "" -> runs/<name>
    jobs: int = 2  # runs at once; each child gets OMP_NUM_THREADS = max(1, cores // jobs)
    cache_dir: str = "runs/lab_cache"  # SFT runs, shared by labs with the same SFT settings


# ------------------------------------------------------------------------------------------------ statistics

# t_{0.975, df} for df = 1..30 (two-sided 95 %); beyond 30 the normal quantile 1.96
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}, the two-sided 95 % quantile of Student's t with df >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"t_quantile_975: df={df} must be >= 1")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(xs: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95 % CI) = (x_bar, t_{0.975,n-1} s / sqrt(n)); half-width None when n = 1."""
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci: no values")
    m = sum(xs) / n
    if n == 1:
        return m, None
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, t_quantile_975(n - 1) * s / math.sqrt(n)


def fmt_ci(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "-"
    m, h = mean_ci(xs)
    return f"{m:.{digits}f} [{m - h:.{digits}f}, {m + h:.{digits}f}]" if h is not None else f"{m:.{digits}f} (n=1, no CI)"


# --------------------------------------------------------------------------------------------------- config


def find_config(path: str | Path, what: str) -> str:
    """`path` as given when it exists from the current folder, else its place in the repository (a relative path), so
    that a lab started elsewhere finds configs/...; a FileNotFoundError saying where it looked otherwise."""
    if Path(path).is_file():
        return str(path)
    if not Path(path).is_absolute() and (ROOT / path).is_file():
        return str(ROOT / path)
    where = str(Path.cwd())
    if not Path(path).is_absolute() and Path.cwd().resolve() != ROOT:
        where += f" or in the repository {ROOT}"
    raise FileNotFoundError(f"{what} {path} not found in {where}")


def load_lab(path: str | Path, overrides: list[str] = ()) -> LabConfig:
    """`config = LabConfig(...)` from a Python file, `--key=value` overrides applied (lists: comma-separated)."""
    path = find_config(path, "lab config")
    lab = runpy.run_path(path).get("config")
    if not isinstance(lab, LabConfig):
        raise ValueError(f"{path} must define `config = LabConfig(...)` (found {type(lab).__name__})")
    for item in overrides:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like --key=value")
        if key in ("variants", "base_overrides"):
            raise ValueError(f"--{key} cannot be set on the command line: edit {path}")
        lab = set_field(lab, key, value)
    return lab


def _key_of(item: str) -> str:
    return item.removeprefix("--").partition("=")[0]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_strings(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


# The labels of the lab's own runs and rows ("sft/seed0", "sft:<variant>/seed0"; rows "SFT", "SFT:<VARIANT>")
RESERVED_NAMES = ("sft",)


def _check_types(lab: LabConfig, source: str) -> None:
    """Each field of the expected form, or a ValueError naming the field, its value and the form."""
    forms = {
        "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
        "base": (lambda v: isinstance(v, str) and v != "", "a run config file, e.g. 'configs/grpo_tiny.py'"),
        "base_overrides": (_is_strings, "a list of '--key=value' strings"),
        "seeds": (lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of ints, e.g. [0, 1, 2]"),
        "variants": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
                     "a dict {name: list of '--key=value' strings}, e.g. {'grpo': []}"),
        "out_dir": (lambda v: isinstance(v, str), "a folder ('' for runs/<name>)"),
        "jobs": (_is_int, "an int >= 1"),
        "cache_dir": (lambda v: isinstance(v, str) and v != "", "a folder, e.g. 'runs/lab_cache'"),
    }
    for f in dataclasses.fields(lab):
        ok, form = forms[f.name]
        if not ok(value := getattr(lab, f.name)):
            raise ValueError(f"{source}: {f.name}={value!r}: expected {form}")
    for name, overrides in lab.variants.items():
        if not _is_strings(overrides):
            raise ValueError(f"{source}: variants[{name!r}]={overrides!r}: expected a list of '--key=value' strings "
                             "([] for the base config as it is)")


def _unfit_row(cfg) -> str | None:
    """Why a resolved run config cannot be a row of the lab (its SFT run, then its GRPO run), or None."""
    if not cfg.eval_split:
        return ("eval_split='': the lab compares held-out EX (each row's, and its SFT run's for the gain), so every "
                "run evaluates; drop --eval_split=")
    if cfg.sft_steps < 1:
        return (f"sft_steps={cfg.sft_steps}: each row's GRPO stage starts from its seed's SFT run and is measured "
                "against it, so sft_steps >= 1 (GRPO from a model without SFT: train.py --sft_steps=0 --model=...)")
    if cfg.grpo_steps < 1:
        return f"grpo_steps={cfg.grpo_steps}: must be >= 1"
    return None


def validate(lab: LabConfig, source: str) -> LabConfig:
    """Every check that can fail before anything runs: a ValueError / FileNotFoundError naming what to fix.
    Returns the lab with its base config located (find_config)."""
    _check_types(lab, source)
    if not lab.seeds:
        raise ValueError(f"{source}: seeds is empty; give at least one seed, e.g. seeds=[0, 1, 2]")
    if len(set(lab.seeds)) != len(lab.seeds):
        raise ValueError(f"{source}: seeds {lab.seeds} has duplicates; each seed once")
    if not lab.variants:
        raise ValueError(f"{source}: variants is empty; give at least one, e.g. variants={{'grpo': []}}")
    if lab.jobs < 1:
        raise ValueError(f"{source}: jobs={lab.jobs} must be >= 1")
    for name in lab.variants:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"{source}: variant name {name!r}: use letters, digits, '_', '-', '.' (it names a folder)")
        if name.lower() in RESERVED_NAMES:
            raise ValueError(f"{source}: variant name {name!r} is reserved for the lab's SFT runs and rows; rename it")
    lab = dataclasses.replace(lab, base=find_config(lab.base, f"{source}: base config"))
    for item in lab.base_overrides:
        if _key_of(item) in LAB_CONTROLLED:
            raise ValueError(f"{source}: base_overrides sets {_key_of(item)}, which the lab sets itself")
    try:
        base = load_config(lab.base, lab.base_overrides)
    except ValueError as e:
        raise ValueError(f"{source}: base_overrides: {e}") from None
    if why := _unfit_row(base):
        raise ValueError(f"{source}: base config {lab.base} with base_overrides: {why}")
    for name, overrides in lab.variants.items():
        for item in overrides:
            if _key_of(item) in LAB_CONTROLLED:
                raise ValueError(f"{source}: variant {name!r} sets {_key_of(item)}, which the lab sets itself")
        try:
            cfg = load_config(lab.base, [*lab.base_overrides, *overrides])
        except ValueError as e:
            raise ValueError(f"{source}: variant {name!r}: {e}") from None
        if why := _unfit_row(cfg):
            raise ValueError(f"{source}: variant {name!r}: {why}")
    return lab


# ------------------------------------------------------------------------------------------------ SFT cache


def sft_overrides(overrides: list[str], seed: int) -> list[str]:
    return [*overrides, f"--seed={seed}", "--grpo_steps=0"]


def sft_key(run_cfg_path: str | Path, overrides: list[str], seed: int) -> str:
    """A short hash of what decides the SFT run (see the module docstring), the toy world's files included."""
    cfg = load_config(run_cfg_path, sft_overrides(overrides, seed))
    flat = {k: v for k, v in _flat(json.loads(json.dumps(config_dict(cfg)))).items()
            if k not in SFT_EXCLUDED and (not k.startswith(SFT_EXCLUDED_GROUPS) or k in SFT_KEPT_IN_GROUPS)}
    h = hashlib.sha256(json.dumps(flat, sort_keys=True).encode())
    if cfg.dataset == "toy":  # what the SFT run reads of the world: a rebuild that changes none of it keeps the key
        world = Path(cfg.data_root or "toyworld")
        splits = {cfg.sft_split or cfg.train_split, cfg.eval_split}
        files = [world / "tables.json", *(world / f"{s}.json" for s in sorted(splits) if s),
                 *sorted((world / "tokenizer").glob("*")), *sorted((world / "database").rglob("*.sqlite"))]
        for p in files:
            h.update(str(p.relative_to(world)).encode() + (p.read_bytes() if p.is_file() else b"missing"))
    return h.hexdigest()[:10]


def run_finished(run_dir: Path, total_steps: int, evaluated: bool = True) -> bool:
    """final/ written and (when the run evaluates: an eval_split) the evaluation after the last step recorded in a
    metrics.jsonl that parses (an unreadable one is an unfinished run)."""
    if not (run_dir / "final" / "config.json").is_file():
        return False
    try:
        evals = read_evals(run_dir)
    except ValueError:  # json.JSONDecodeError, UnicodeDecodeError
        return False
    return not evaluated or any(e.get("step") == total_steps and "ex_voted" in e for e in evals)


def damage(run_dir: Path) -> str | None:
    """What makes a finished run's final/ model unusable, found without loading it (only headers are read): a
    config.json that is not a JSON object, no tokenizer.json, weights missing, or a safetensors file whose header
    cannot be read or does not cover the file (truncated); None when none of these. The lab runs a damaged cached SFT
    run again instead of handing it to GRPO runs that would fail loading it."""
    final = run_dir / "final"
    try:
        read_json(final / "config.json")
        if not (final / "tokenizer.json").is_file():
            return f"{final / 'tokenizer.json'} is missing"
        files, _, listing = _weight_files(final)
        for file in files:
            if not file.is_file():
                return f"{file} is listed in {listing} but missing"
            try:
                with safe_open(file, framework="pt") as f:
                    f.keys()
            except Exception as e:  # safetensors' own error type: a truncated or foreign file
                return f"{file}: not a readable safetensors file ({e})"
    except (OSError, ValueError) as e:
        return str(e)
    return None


def _try_lock(path: Path, wait: bool = False) -> TextIO | None:
    """An exclusive flock on `path` (created, our PID written in it) as an open file, held until it is closed or the
    process ends however it ends (no stale lock); None when another process holds it (wait=True: wait for it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        f.close()
        return None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _holder(path: Path) -> str:
    """The PID a held lock file names."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def lock_lab(out: Path) -> TextIO:
    """Hold out/lab.lock (see _try_lock) for the lab's life, before its first action: a second lab on the same folder
    would remove runs the first has started but whose train.py has not yet locked its directory."""
    path = out / "lab.lock"
    lock = _try_lock(path)
    if lock is None:
        raise ValueError(f"{out} is in use by another lab (PID {_holder(path)}, holding {path}); wait for it to end "
                         "or stop it, then rerun")
    return lock


def _claim_path(run_dir: Path) -> Path:
    """The lock a lab or tool holds on a cached SFT run while it checks, removes or runs it: a hidden file next to the
    run directory (which is removed and recreated under it), out of the way of globs like sft-*."""
    return run_dir.with_name(f".{run_dir.name}.lock")


def _prepare_world(run_cfg_path: str | Path, overrides: list[str], seeds: list[int] = ()) -> None:
    """Build the toy world and the seeds' initial models (once, here, not by runs racing in parallel) before the
    world's files are hashed; no-op for other datasets."""
    cfg = load_config(run_cfg_path, overrides)
    if cfg.dataset == "toy":
        from sqlr1.toyworld import ensure_toyworld, init_model

        root = ensure_toyworld(cfg.data_root or "toyworld", seed=0)
        if not cfg.model:
            for seed in seeds:
                if not (root / f"model_seed{seed}" / "config.json").is_file():
                    init_model(root / f"model_seed{seed}", root / "tokenizer", seed=seed)


def sft_checkpoint(run_cfg_path: str | Path, overrides: list[str], seed: int, cache_dir: str | Path) -> Path:
    """The cached SFT model (final/ dir) of `run_cfg_path` + overrides at `seed`; runs the SFT first when missing.

    Public for other tools (the TRL referee benchmark) that need the lab's SFT weights.
    """
    _prepare_world(run_cfg_path, overrides, [seed])
    cfg = load_config(run_cfg_path, sft_overrides(overrides, seed))
    run_dir = Path(cache_dir) / f"sft-{sft_key(run_cfg_path, overrides, seed)}"
    evaluated = bool(cfg.eval_split)
    claim = _try_lock(_claim_path(run_dir))
    if claim is None:
        print(f"{run_dir} is being made by another process (PID {_holder(_claim_path(run_dir))}); waiting for it",
              file=sys.stderr)
        claim = _try_lock(_claim_path(run_dir), wait=True)
    with claim:
        finished = run_finished(run_dir, cfg.sft_steps, evaluated)
        why = damage(run_dir) if finished else None
        if why:
            print(f"{run_dir}: the cached SFT model is damaged ({why}); running it again", file=sys.stderr)
        if not finished or why:
            _clear(run_dir)
            proc = _start(Run(f"sft/seed{seed}", run_dir, str(run_cfg_path), sft_overrides(overrides, seed),
                              cfg.sft_steps), threads=max(1, _cores()), extra_args=[])
            try:
                rc = proc.wait()
            finally:
                _kill(proc)
            if rc != 0 or not run_finished(run_dir, cfg.sft_steps, evaluated):
                raise RuntimeError(f"SFT run failed (exit {rc}): see {run_dir / 'train.log'}")
    return run_dir / "final"


# ------------------------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    label: str  # "sft/seed0", "dapo/seed1"
    dir: Path
    base: str
    args: list[str]
    total_steps: int  # the step of its last evaluation
    needs: str | None = None  # label of the SFT run it starts from


def _clear(run_dir: Path) -> None:
    """Remove an unfinished run directory to start it over, unless a live train.py still holds its lock (another
    lab or benchmark on the same cache): then the lock's error names that process."""
    if (run_dir / "train.lock").is_file():
        lock_run_dir(run_dir).close()
    shutil.rmtree(run_dir, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the lab dies, even by SIGKILL (Linux), so no run outlives it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def is_done(run: Run) -> bool:
    """Finished (run_finished); an SFT run with an intact final/ model (damage), a GRPO run with the command line it
    would be started with now (its lab_run.json): an edited variant, or a new SFT model (a changed cache key), makes it
    run again."""
    if not run_finished(run.dir, run.total_steps):
        return False
    if run.needs is None:
        return damage(run.dir) is None
    recorded = run.dir / "lab_run.json"
    return recorded.is_file() and json.loads(recorded.read_text()) == {"base": run.base, "args": run.args}


def _start(run: Run, threads: int, extra_args: list[str]) -> subprocess.Popen:
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / "lab_run.json").write_text(json.dumps({"base": run.base, "args": run.args}) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(TRAIN_PY), "--config", run.base, *run.args, *extra_args, f"--out_dir={run.dir}"]
    with open(run.dir / "train.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)  # own group: killed as one


def _kill(proc: subprocess.Popen) -> None:
    """End the child's whole process group (train.py, its sandbox workers): SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def plan(lab: LabConfig, out: Path) -> tuple[list[Run], dict[str, Run]]:
    """The runs: the SFT runs (in the cache), then per seed every variant's GRPO stage from its SFT run.

    A variant's SFT run is the one its own settings key (`sft_key` of base_overrides + its overrides): variants that
    change only GRPO-stage settings share one SFT per seed; one that changes what SFT computes (e.g. the cold-start
    split, sft_steps, the prompt template) gets its own, and its gain is paired with that SFT.
    """
    sfts: dict[str, Run] = {}  # label -> SFT run
    grpo = []
    for seed in lab.seeds:
        for name, overrides in lab.variants.items():
            both = [*lab.base_overrides, *overrides]
            sft_dir = Path(lab.cache_dir) / f"sft-{sft_key(lab.base, both, seed)}"
            sft = next((r for r in sfts.values() if r.dir == sft_dir), None)
            if sft is None:
                label = f"sft/seed{seed}" if not sfts or name == next(iter(lab.variants)) else f"sft:{name}/seed{seed}"
                sft = sfts[label] = Run(label, sft_dir, lab.base, sft_overrides(both, seed),
                                        load_config(lab.base, both).sft_steps)
            args = [*both, f"--seed={seed}", f"--model={(sft.dir / 'final').absolute()}", "--sft_steps=0",
                    "--eval_init=false"]
            steps = load_config(lab.base, both).grpo_steps
            grpo.append(Run(f"{name}/seed{seed}", out / name / f"seed{seed}", lab.base, args, steps, needs=sft.label))
    return [*sfts.values(), *grpo], sfts


def _claim_sft(run: Run, waiting: set[str]) -> TextIO | None:
    """The claim on a cached SFT run (_claim_path) when no other process holds it, else None (said once per run)."""
    claim = _try_lock(_claim_path(run.dir))
    if claim is None and run.label not in waiting:
        waiting.add(run.label)
        tqdm.write(f"{run.label}: {run.dir} is being made by another process (PID {_holder(_claim_path(run.dir))}); "
                   "waiting for it", file=sys.stderr)
    return claim


def execute(lab: LabConfig, out: Path, runs: list[Run], on_finished) -> None:
    """Run what is not finished, `lab.jobs` at a time, each SFT before the GRPO runs that need it.

    An SFT run (in the shared cache) is claimed before it is checked, removed or started, and the claim is held until
    it ends; one another process holds is waited for, then used as it left it (or run here when it did not finish).
    """
    threads = max(1, _cores() // lab.jobs)
    extra_args = ["--sandbox_workers=1"] if lab.jobs > 1 else []  # not part of a run's identity (lab_run.json)
    done = {r.label for r in runs if r.needs is not None and is_done(r)}  # SFT runs: checked once claimed
    pending = [r for r in runs if r.label not in done]
    running: dict[str, tuple[Run, subprocess.Popen]] = {}
    claims, waiting = {}, set()  # SFT label -> its held claim; SFT runs said to be waited for
    bar = tqdm(total=len(runs), initial=len(done), desc=f"lab {lab.name}", unit="run", dynamic_ncols=True)
    try:
        while pending or running:
            for r in list(pending):
                if len(running) >= lab.jobs:
                    break
                if r.needs is not None and r.needs not in done:
                    continue
                if r.needs is None:
                    if (claim := _claim_sft(r, waiting)) is None:
                        continue
                    finished = run_finished(r.dir, r.total_steps)
                    why = damage(r.dir) if finished else None
                    if finished and why is None:
                        claim.close()
                        pending.remove(r)
                        done.add(r.label)
                        bar.update(1)
                        continue
                    if why:
                        tqdm.write(f"{r.label}: the cached SFT model in {r.dir} is damaged ({why}); running it again",
                                   file=sys.stderr)
                    claims[r.label] = claim
                pending.remove(r)
                _clear(r.dir)  # an unfinished run starts over
                running[r.label] = (r, _start(r, threads, extra_args))
            if bar.postfix != (names := ", ".join(running)):
                bar.set_postfix_str(names)
            time.sleep(0.5)
            for label, (r, proc) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[label]
                if label in claims:
                    claims.pop(label).close()
                if rc != 0 or not run_finished(r.dir, r.total_steps):
                    raise RuntimeError(f"run {label} failed (exit {rc}): see {r.dir / 'train.log'}")
                done.add(label)
                bar.update(1)
                on_finished()
    finally:
        for _, proc in running.values():
            _kill(proc)
        for claim in claims.values():
            claim.close()
        bar.close()


# --------------------------------------------------------------------------------------------------- results


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def collect(lab: LabConfig, runs: list[Run], sfts: dict[str, Run]) -> dict:
    """Per variant per seed, from the finished runs' metrics.jsonl: the numbers of lab.json."""
    result = {}
    for r in runs:
        if r.needs is None or not is_done(r):
            continue
        name, seed = r.label.split("/seed")
        sft_eval = read_evals(sfts[r.needs].dir)[-1]
        recs = _records(r.dir)
        grpo = [x for x in recs if x["stage"] == "grpo"]
        evals = [x for x in recs if x["stage"].startswith("eval:")]
        final = evals[-1]
        result.setdefault(name, {})[seed] = {
            "sft_ex_greedy": sft_eval["ex_greedy"], "sft_ex_voted": sft_eval["ex_voted"],
            "ex_greedy": final["ex_greedy"], "ex_voted": final["ex_voted"], "format_ok": final["format_ok"],
            "reward_last20": sum(x["reward"] for x in grpo[-20:]) / max(len(grpo[-20:]), 1),
            "s_per_step": sum(x["time_rollout"] + x["time_reward"] + x["time_train"] for x in grpo) / max(len(grpo), 1),
            "ex_curve": [[0, sft_eval["ex_greedy"]]] + [[e["step"], e["ex_greedy"]] for e in evals],
            "reward_curve": [x["reward"] for x in grpo],
            "run_dir": str(r.dir), "sft_dir": str(sfts[r.needs].dir), "sft_row": r.needs.split("/seed")[0].upper(),
        }
    return {name: result[name] for name in lab.variants if name in result}


def markdown(lab: LabConfig, results: dict, wall_s: float) -> str:
    lines = [f"# lab {lab.name}: {lab.base}, seeds {lab.seeds}", "",
             "mean [95 % CI over seeds, Student's t]; gain = greedy EX after GRPO - after SFT, paired by seed", "",
             "| variant | n | greedy EX | gain over SFT | voted EX | format | reward last 20 | s/step |",
             "|---|---|---|---|---|---|---|---|"]
    sft: dict[str, dict] = {}  # one row per SFT run family ("SFT"; "SFT:<variant>" for a variant with its own)
    for per_seed in results.values():
        for seed, v in per_seed.items():
            sft.setdefault(v["sft_row"], {})[seed] = v
    for row, per_seed in sft.items():
        vs = list(per_seed.values())
        lines.append(f"| {row} | {len(vs)} | {fmt_ci([v['sft_ex_greedy'] for v in vs])} | - | "
                     f"{fmt_ci([v['sft_ex_voted'] for v in vs])} | - | - | - |")
    for name, per_seed in results.items():
        vs = list(per_seed.values())
        lines.append(
            f"| {name} | {len(vs)} | {fmt_ci([v['ex_greedy'] for v in vs])} | "
            f"{fmt_ci([v['ex_greedy'] - v['sft_ex_greedy'] for v in vs])} | {fmt_ci([v['ex_voted'] for v in vs])} | "
            f"{sum(v['format_ok'] for v in vs) / len(vs):.3f} | {sum(v['reward_last20'] for v in vs) / len(vs):.3f} | "
            f"{sum(v['s_per_step'] for v in vs) / len(vs):.2f} |")
    lines += ["", f"wall time of the lab: {wall_s / 60:.1f} min (all invocations; {_cores()} cores, jobs={lab.jobs})", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> str | None:
    """lab.png (sqlr1/plots.py), or why it was skipped."""
    from sqlr1.plots import plot_lab

    if plot_lab(results, path, mean_ci):
        return None
    return "lab.png skipped: matplotlib is not installed (pip install -e '.[plots]')"


def write_outputs(lab: LabConfig, out: Path, runs: list[Run], sfts: dict[str, Run], wall_s: float) -> str | None:
    results = collect(lab, runs, sfts)
    out.mkdir(parents=True, exist_ok=True)
    record = {"name": lab.name, "base": lab.base, "seeds": lab.seeds, "variants": lab.variants,
              "lab": dataclasses.asdict(lab), "wall_s": wall_s, "results": results}
    tmp = out / "lab.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out / "lab.json")
    (out / "lab.md").write_text(markdown(lab, results, wall_s))
    return plot(results, out / "lab.png") if results else None


# ------------------------------------------------------------------------------------------------------ main


@contextlib.contextmanager
def _interrupts():
    """SIGINT, SIGTERM and SIGHUP as one KeyboardInterrupt, wherever it lands; further ones are ignored while the lab
    winds down (kills its children). Yields a list that holds the first signal's number once one came; the previous
    handlers are restored on exit."""
    caught: list[int] = []

    def handler(signum, frame) -> None:
        if not caught:
            caught.append(signum)
            raise KeyboardInterrupt

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = [signal.signal(sig, handler) for sig in signals]
    try:
        yield caught
    finally:
        for sig, old in zip(signals, previous):
            signal.signal(sig, old)


def main(argv: list[str]) -> int:
    """The lab, 130 with one line saying how to continue when interrupted: whatever exception the interrupt became
    (a KeyboardInterrupt raised inside an import can surface as another error, e.g. matplotlib's RuntimeError "Error
    calling __set_name__"), the interrupt is what is reported."""
    kept: list[str] = []  # where finished runs are, once known
    with _interrupts() as caught:
        try:
            return _run(argv, kept)
        except BaseException:
            if not caught:
                raise
        where = f"finished runs are kept in {' and '.join(kept)}; " if kept else ""
        print(f"\ninterrupted: {where}continue with: {shlex.join(['python', '-m', 'sqlr1.lab', *argv])}",
              file=sys.stderr)
        return 130


def _run(argv: list[str], kept: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="Python file defining `config = LabConfig(...)`")
    args, overrides = ap.parse_known_args(argv)
    lab = validate(load_lab(args.config, overrides), args.config)
    out = Path(lab.out_dir or f"runs/{lab.name}")
    with lock_lab(out):
        kept += [str(out), lab.cache_dir]
        _prepare_world(lab.base, lab.base_overrides, lab.seeds)
        runs, sfts = plan(lab, out)
        previous = out / "lab.json"  # a resumed lab adds its earlier invocations' wall time
        started = time.time() - (json.loads(previous.read_text()).get("wall_s", 0.0) if previous.is_file() else 0.0)

        def on_finished() -> None:
            write_outputs(lab, out, runs, sfts, time.time() - started)

        execute(lab, out, runs, on_finished)
        msg = write_outputs(lab, out, runs, sfts, time.time() - started)
    if msg:
        print(msg)
    print((out / "lab.md").read_text())
    print(f"lab: {out / 'lab.md'}, {out / 'lab.json'}" + ("" if msg else f", {out / 'lab.png'}"))
    return 0


def cli(argv: list[str]) -> int:
    """main with one `error:` line instead of a traceback: 2 for bad input (nothing ran), 1 for a failed run."""
    try:
        return main(argv)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from sqlr1 import lab  # the imported module, so that config files' LabConfig is this class, not __main__'s copy

    sys.exit(lab.cli(sys.argv[1:]))
