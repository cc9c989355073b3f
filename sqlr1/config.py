"""Run configuration: one dataclass, Python config files, `--key=value` overrides.

A config file (configs/*.py) is plain Python that defines one instance named `config`:

    from sqlr1.config import TrainConfig
    config = TrainConfig(model="Qwen/Qwen2.5-Coder-7B-Instruct", grpo_steps=200, ...)

`train.py --config FILE --lr=1e-6 --grpo.kl_coef=0 --reward.mode=bird` overrides fields; values are parsed to the
field's type, nested dataclasses are addressed with dots, and an unknown key is an error naming the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import runpy
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sqlr1.grpo import GRPOConfig
from sqlr1.reward import RewardConfig

# TrainConfig.dtype (and sample.py --dtype) names -> torch dtypes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainConfig:
    # --- run ---
    name: str = "run"
    out_dir: str = ""  # "" -> runs/<name>-<timestamp>
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dist_timeout: float = 1800.0  # seconds a collective waits for the slowest rank (several ranks) before failing
    # --- model ---
    model: str = ""  # local HF-layout directory or hub repo id
    dtype: str = "bfloat16"  # compute dtype (rollouts, forward); master weights and Adam state stay fp32
    gradient_checkpointing: bool = True
    # --- data ---
    dataset: str = "spider"  # spider | bird | synsql | toy
    data_root: str = ""
    train_split: str = "train"  # GRPO prompts and gold SQL (and the SFT data unless sft_split is set)
    sft_split: str = ""  # cold-start data when it is not train_split (the toy world's teacher traces: "sft")
    eval_split: str = "dev"
    prompt_template: str = "sqlr1"  # sqlr1 | short  (templates live in sqlr1/data.py)
    sample_values: int = 0  # example values per column in the schema text
    max_prompt_len: int = 4096
    max_response_len: int = 2048
    drop_empty_gold: bool = True
    # --- cold-start SFT (skipped when sft_steps == 0) ---
    sft_steps: int = 0
    sft_lr: float = 5e-5
    sft_batch_size: int = 1  # sequences per rank per optimizer step
    # --- GRPO (skipped when grpo_steps == 0) ---
    grpo_steps: int = 0
    prompts_per_step: int = 8  # B, over all ranks
    group_size: int = 8  # G rollouts per prompt
    micro_batch_size: int = 8  # sequences per forward/backward
    # FSDP micro-batch gradients. False: reduce-scatter after every micro-batch, only sharded grads are held (4P/N
    # bytes), K reduce-scatters per step. True: one reduce-scatter per step, but each rank holds the full unsharded
    # fp32 gradient (4P bytes, ~28 GiB at 7B) from the first micro-batch on. No effect in one process.
    grad_accum_no_sync: bool = False
    shared_prefix: bool = True  # GRPO policy/reference forward computes each group's prompt once, not G times
    # log pi_old from the trainer's own forward (rho = 1 exactly before the update) instead of the rollout engine's
    # bf16 KV-cached log-probs (which differ numerically: rho != 1 from the start). ppo_epochs == 1: the update's
    # forward, detached (free); > 1: one extra no-grad forward per step
    recompute_old_logp: bool = True
    ppo_epochs: int = 1  # mu: optimisation passes over each rollout batch
    lr: float = 3e-7
    temperature: float = 1.1
    top_p: float = 1.0
    top_k: int = 0
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    # --- multi-turn rollouts (sqlr1/sql_env.py): 0 turns is single turn, SQL-R1 as published ---
    max_turns: int = 0  # <sql> queries a rollout may run inside <think> (later ones are not executed)
    obs_rows: int = 5  # rows an observation shows (the sandbox fetches only these)
    obs_max_tokens: int = 128  # tokens per observation, tags included
    query_cost: float = 0.0  # subtracted from a rollout's reward per executed query
    # --- optimizer (both stages) ---
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    max_bad_steps: int = 3  # stop after this many consecutive non-finite steps
    # --- evaluation (held-out EX; greedy and self-consistency voting) ---
    eval_every: int = 0  # GRPO steps between evaluations; 0: only before and after GRPO
    eval_limit: int = 0  # 0: all eval examples
    eval_n: int = 8
    eval_temperature: float = 0.8
    # Prompts per generate call in evaluation (0: all of a rank's prompts at once); the voted pass has
    # eval_batch_size * eval_n rows. At 7B one prompt's voted KV cache is 8 rows x 6,143 columns x 57,344 B
    # (28 layers x K,V x 4 KV heads x 128 x bf16) = 2.8 GB: size it with `train.py --dry_run` (grpo_7b: 8).
    eval_batch_size: int = 4
    eval_init: bool = True  # evaluate the starting weights before GRPO when sft_steps == 0 (the lab: False, cached)
    # "always": every evaluation also votes (eval_n candidates); "final": only the last one does, the intermediate
    # ones (eval_every) are greedy-only and their records carry no ex_voted (voting costs eval_n x the sampling)
    eval_vote: str = "always"
    # --- execution sandbox (the per-query deadline is reward.timeout) ---
    sandbox_workers: int = 0  # per rank; 0: the node's cores / LOCAL_WORLD_SIZE (at least 1)
    # --- checkpoints and logging ---
    save_every: int = 0  # optimizer steps; 0: only at the end
    keep_last: int = 0  # training checkpoints kept (newest N; 0: all); final/ is always kept
    log_samples: int = 2  # completions per step written to samples.jsonl
    wandb_project: str = ""
    compile: str = "auto"  # torch.compile the sampler's decode step: auto (on CUDA) | true | false

    def compile_decode(self, device: torch.device) -> bool:
        """Whether rollouts and evaluations decode with the compiled step: on CUDA by default, where an eager decode
        step is bound by kernel launches; on CPU only when asked (its compile costs more than it saves here)."""
        return self.compile == "true" or (self.compile == "auto" and device.type == "cuda")

    def __post_init__(self) -> None:
        choices = {"device": ("auto", "cpu", "cuda"), "dtype": ("float32", "bfloat16", "float16"),
                   "dataset": ("spider", "bird", "synsql", "toy"), "prompt_template": ("sqlr1", "short"),
                   "lr_schedule": ("constant", "cosine"), "compile": ("auto", "true", "false"),
                   "eval_vote": ("always", "final")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config {name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        positive = ("max_prompt_len", "max_response_len", "prompts_per_step", "group_size", "micro_batch_size",
                    "ppo_epochs", "sft_batch_size", "eval_n", "max_bad_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"config {name}={getattr(self, name)}: must be >= 1")
        for name in ("sft_steps", "grpo_steps", "warmup_steps", "eval_every", "eval_limit", "save_every",
                     "eval_batch_size", "keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"config {name}={getattr(self, name)}: must be >= 0")
        # Written as `not (lo <= x <= hi)` so that NaN fails too.
        ranges = {"lr": (0, 1), "sft_lr": (0, 1), "temperature": (1e-6, 100), "eval_temperature": (0, 100),
                  "top_p": (1e-9, 1), "weight_decay": (0, 1e6), "adam_eps": (0, 1), "grad_clip": (1e-12, math.inf),
                  "dist_timeout": (1, 1e6)}
        for name, (lo, hi) in ranges.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ValueError(f"config {name}={value}: must lie in [{lo:g}, {hi:g}]")
        if self.max_turns < 0 or self.obs_rows < 1 or self.obs_max_tokens < 8 or not 0 <= self.query_cost < math.inf:
            raise ValueError(f"config max_turns={self.max_turns} (>= 0), obs_rows={self.obs_rows} (>= 1), "
                             f"obs_max_tokens={self.obs_max_tokens} (>= 8), query_cost={self.query_cost} (finite, "
                             ">= 0): out of range")
        if self.top_k < 0 or self.sample_values < 0 or self.sandbox_workers < 0:
            raise ValueError("config top_k, sample_values and sandbox_workers must be >= 0")
        if self.grpo.tis_cap > 0 and not self.recompute_old_logp:
            raise ValueError("config grpo.tis_cap > 0 needs recompute_old_logp=True (without it pi_old is the "
                             "sampler's log-prob and every TIS weight is 1)")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"config adam_betas={self.adam_betas}: each must lie in [0, 1)")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read `config` from a Python file (or defaults when path is None) and apply `--key=value` overrides."""
    if path is None:
        cfg = TrainConfig()
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found (try one of configs/*.py)")
        cfg = runpy.run_path(str(path)).get("config")
        if not isinstance(cfg, TrainConfig):
            raise ValueError(f"{path} must define `config = TrainConfig(...)` (found {type(cfg).__name__})")
        if cfg.name == "run":
            cfg.name = path.stem
    for item in overrides:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like --key=value")
        cfg = set_field(cfg, key, value)
    return cfg


def set_field(cfg, dotted_key: str, value: str):
    """A copy of cfg with field `dotted_key` set from a string parsed to the field's declared type.

    Nested groups are rebuilt with dataclasses.replace, so frozen groups (RewardConfig) work and re-validate.
    """
    return _set(cfg, dotted_key.split("."), 0, value, dotted_key)


def _set(obj, path: list[str], depth: int, value: str, full: str):
    name = path[depth]
    valid = [f.name for f in dataclasses.fields(obj)]
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean {'.'.join(path[:depth] + close)}?" if close else ""
        raise ValueError(f"unknown config key {full!r}{hint}")
    if depth == len(path) - 1:
        new = _parse(value, typing.get_type_hints(type(obj))[name], full)
    elif dataclasses.is_dataclass(child := getattr(obj, name)):
        new = _set(child, path, depth + 1, value, full)
    else:
        raise ValueError(f"unknown config key {full!r}: {name} is a single setting, not a group")
    return dataclasses.replace(obj, **{name: new})


def _parse(value: str, typ, key: str):
    if dataclasses.is_dataclass(typ):
        raise ValueError(f"{key} is a group of settings; set its fields, e.g. --{key}.<field>=...")
    try:
        if typ is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typing.get_origin(typ) is list:  # --seeds=0,1,2
            return [typing.get_args(typ)[0](v) for v in value.strip("()[] ").split(",") if v.strip()]
        if typing.get_origin(typ) is tuple:
            items = [v for v in value.strip("()[] ").split(",") if v.strip()]
            return tuple(t(v) for t, v in zip(typing.get_args(typ), items, strict=True))
        return typ(value)
    except ValueError:
        raise ValueError(f"--{key}={value!r}: expected {getattr(typ, '__name__', typ)}") from None


def config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Write the resolved config as JSON (the run's record of what it ran with)."""
    path.write_text(json.dumps(config_dict(cfg), indent=2) + "\n")


# Settings a resumed run may change: they decide how fast, with how much memory, where, and what is evaluated, saved
# or logged, never what a training step computes. sft_steps and grpo_steps are checked separately (the steps already
# done must keep their meaning). Every other key must match the run's config.json.
RESUMABLE_CHANGES = frozenset({
    "name", "device", "gradient_checkpointing", "micro_batch_size", "grad_accum_no_sync", "shared_prefix", "compile",
    "eval_split", "eval_every", "eval_limit", "eval_n", "eval_temperature", "eval_batch_size", "eval_init", "eval_vote",
    "sandbox_workers", "save_every", "keep_last", "log_samples", "wandb_project", "max_bad_steps", "dist_timeout",
})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: dict, cfg: TrainConfig, step: int, stage: str | None, source: Path) -> dict[str, list]:
    """{key: [saved value, new value]} for every setting `cfg` changes in a run saved as `saved` (its config.json).

    Resuming at `step` (in `stage`) may change the settings of RESUMABLE_CHANGES and the stage lengths, as long as
    the steps already done stay what they were: grpo_steps >= the GRPO steps done; sft_steps only while no GRPO step
    is done, and >= the SFT steps done. Anything else (model, data, seed, group size, learning rates, reward, ...)
    would make the resumed steps differ from the run's record: a ValueError naming the key and both values.
    A key the saved config lacks (a setting added since) counts as its default; out_dir is where the run lives now
    (a moved run directory is the same run), not compared.
    """
    new = _flat(json.loads(json.dumps(config_dict(cfg))))  # tuples -> lists, as config.json stores them
    old = {**_flat(json.loads(json.dumps(config_dict(TrainConfig())))), **_flat(saved)}
    changes = {k: [old.get(k), v] for k, v in new.items() if old.get(k) != v and k != "out_dir"}  # moved: same run
    sft_done, grpo_done = (old["sft_steps"], step - old["sft_steps"]) if stage == "grpo" else (step, 0)
    for key, (before, after) in changes.items():
        if key in RESUMABLE_CHANGES:
            continue
        if key == "grpo_steps" and after >= grpo_done:
            continue
        if key == "sft_steps" and grpo_done == 0 and after >= sft_done:
            continue
        why = {"sft_steps": f" (the checkpoint at step {step} has done {sft_done} SFT and {grpo_done} GRPO steps)",
               "grpo_steps": f" (the checkpoint at step {step} has done {grpo_done} GRPO steps)"}.get(key, "")
        raise ValueError(f"--resume: {key}={after!r} differs from the run's {key}={before!r} in {source}{why}; "
                         f"resume with the run's value, or start a new run (another --out_dir)")
    return changes
