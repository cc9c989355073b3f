"""Train SQL-R1: an optional supervised cold start, then GRPO on execution rewards.

    python train.py --config configs/grpo_tiny.py                      # toy world demo on a CPU, minutes
    torchrun --nproc_per_node=8 train.py --config configs/grpo_7b.py   # the paper's recipe on 8 GPUs
    python train.py --config configs/grpo_tiny.py --resume --out_dir=runs/x   # continue an interrupted run

One GRPO step (SQL-R1, Sec. 3):
    1. take B prompts; sample G completions each from pi_theta (this step's weights: on-policy);
    2. execute every completion's SQL in the sandbox -> reward r = S_f + S_e + S_r + S_l;
    3. group-relative advantages A_i = (r_i - mean(r_group)) / (std(r_group) + eps);
    4. mu passes of the clipped objective + beta * KL(pi_theta || pi_ref) over micro-batches, one AdamW step each.
Steps [0, sft_steps) are SFT, [sft_steps, sft_steps + grpo_steps) GRPO; each stage has its own optimizer.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import shlex
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sqlr1 import distributed
from sqlr1.batch import Sequence
from sqlr1.checkpoint import check_vocab, load_model, read_json, source_extras
from sqlr1.config import DTYPES, TrainConfig, config_dict, load_config, resume_changes, save_config
from sqlr1.data import SHORT_PROMPT, SQLR1_PROMPT, Example, build_prompt, filter_for_rl, load_dataset, sft_response
from sqlr1.grpo import finalize_metrics, finalize_mismatch, group_advantages, keep_groups, loss_norm
from sqlr1.hub import resolve_checkpoint
from sqlr1.inference import completion_text, evaluate_policy, generate_episodes
from sqlr1.reward import score_batch
from sqlr1.run import (
    MetricsLog, last_logged_step, latest_checkpoint, load_checkpoint, lock_run_dir, make_run_dir, plot_metrics,
    promote_final, prune_checkpoints, read_evals, read_trainer_state, record_config_changes,
    remove_partial_checkpoints, resume_checkpoint, save_checkpoint,
)
from sqlr1.sandbox import Sandbox
from sqlr1.sql_env import encode_with_observations, model_text
from sqlr1.tokenizer import load_tokenizer
from sqlr1.update import (
    compute_context, make_optimizer, micro_batch_logprobs, microbatches, optimizer_step, recompute_old_logprobs,
    train_on_micro_batches,
)



def reduce_metric_sums(sums: dict) -> dict:
    keys = sorted(sums)
    t = distributed.all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
    return dict(zip(keys, t.tolist()))


# ------------------------------------------------------------------------------------------------------ data


def step_indices(num_examples: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the examples used at `step`: a fresh seeded shuffle each epoch, consumed in order.

    Depends only on (step, seed), so a resumed run sees exactly the batches the uninterrupted run would have.
    """
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, num_examples)
        order = list(range(num_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[pos])
    return out


def shared_rl_filter(examples, prompts, sandbox: Sandbox, cfg: TrainConfig, d) -> tuple[list[int], dict]:
    """`filter_for_rl` run once, on rank 0, and its (kept indices, drop counts) broadcast to every rank.

    Every rank must train on the same example list (`step_indices` picks rank r's prompts from it by position); a
    gold that times out on one rank and not on another would otherwise give ranks different lists.
    """
    result = None
    if d.is_main:
        result = filter_for_rl(examples, prompts, sandbox, cfg.max_prompt_len, drop_empty_gold=cfg.drop_empty_gold,
                               timeout=cfg.reward.timeout)
    return distributed.broadcast_object(result)


# ---------------------------------------------------------------------------------------------------- stages


def sft_step(step, policy, opt, sched, examples, prompts, tokenizer, cfg, d, ctx) -> dict:
    """One cold-start SFT step: cross-entropy on response tokens only (prompt tokens are masked out, and so are the
    observations of multi-turn traces, encoded as the SQL environment encodes them)."""
    t0 = time.time()
    per_rank = cfg.sft_batch_size
    idx = step_indices(len(examples), per_rank * d.world_size, step, cfg.seed)[d.rank * per_rank : (d.rank + 1) * per_rank]
    seqs = []
    for i in idx:
        ids, own = encode_with_observations(tokenizer, sft_response(examples[i]), cfg.obs_max_tokens)
        n = cfg.max_response_len - 1
        seqs.append(Sequence(prompts[i].ids, ids[:n] + [tokenizer.eos_ids[0]],
                             loss_mask=None if all(own) else own[:n] + [1.0]))
    mbs = microbatches(seqs, cfg.micro_batch_size, tokenizer.pad_id, d.device)
    norm = loss_norm([mb.mask for mb in mbs], cfg.max_response_len, world_reduce=distributed.all_reduce)
    loss_sum, _ = train_on_micro_batches(policy, mbs, norm, cfg, d, ctx, tokenizer.vocab_size, sft=True)
    grad_norm, loss, ok = optimizer_step(policy, opt, sched, cfg, loss_sum)
    tokens = float(distributed.all_reduce(torch.tensor(float(sum(mb.num_tokens for mb in mbs)))))
    dt = time.time() - t0
    return {"stage": "sft", "step": step + 1, "loss": loss, "grad_norm": grad_norm,
            "lr": sched.get_last_lr()[0], "skipped": not ok, "train_tokens_per_s": tokens / dt, "time": dt}


def grpo_step(step, policy, rollout_model, ref, opt, sched, examples, prompts, tokenizer, sandbox, cfg, d, ctx,
              totals: dict | None = None) -> tuple[dict, list[dict]]:
    """One GRPO step on this rank's B / world_size prompts (groups are never split across ranks).

    A step in which the DAPO filter keeps no group on any rank (all rewards equal within every group) trains
    nothing: it is skipped on every rank together (the decision is an all-reduced count), without an optimizer
    step, and counted (`skipped_zero_var`; `totals`, if given, carries the running count over the run's steps).
    Its learning-rate schedule does not advance either: the schedule counts optimizer steps taken.
    """
    t0 = time.time()
    per_rank = cfg.prompts_per_step // d.world_size
    gstep = step - cfg.sft_steps
    idx = step_indices(len(examples), cfg.prompts_per_step, gstep, cfg.seed)[d.rank * per_rank : (d.rank + 1) * per_rank]
    if rollout_model is not policy:
        distributed.copy_full_weights(policy, rollout_model)  # on-policy: this step's weights
    G = cfg.group_size
    # max_turns > 0: multi-turn episodes, the rollouts query their databases inside <think> (sqlr1/sql_env.py)
    samples, env = generate_episodes(
        rollout_model, tokenizer, [prompts[i].ids for i in idx], [str(examples[i].db_path) for i in idx], sandbox,
        G, cfg.max_turns, cfg.obs_rows, cfg.obs_max_tokens, cfg.reward.timeout, max_new_tokens=cfg.max_response_len,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, stop_ids=tokenizer.eos_ids,
        vocab_size=tokenizer.vocab_size, seed=(cfg.seed * 1_000_003 + step) * 1009 + d.rank, compile=cfg.compile_decode(d.device),
        progress=False,
    )
    if rollout_model is not policy:
        distributed.free_weights(rollout_model)  # the rollout copy holds memory only while it samples
    t_rollout = time.time()

    texts = [completion_text(tokenizer, t) for t in samples.tokens]  # what the policy saw, observations included
    own = [model_text(tokenizer, t, m) for t, m in zip(samples.tokens, samples.model_mask)]  # what it wrote
    golds = [(str(examples[idx[p]].db_path), examples[idx[p]].sql) for p in samples.prompt_index]
    rewards = score_batch(sandbox, own, golds, cfg.reward, count_tokens=lambda s: len(tokenizer.encode(s)))
    executed = [sum(t.status != "refused" for t in turns) for turns in env.turns] if env else [0] * len(texts)
    t_reward = time.time()

    # R = SQL-R1's reward of the final answer - query_cost x (queries executed)
    r = torch.tensor([x.total - cfg.query_cost * q for x, q in zip(rewards, executed)], dtype=torch.float32)
    adv, adv_stats = group_advantages(r, G, cfg.grpo, world_reduce=distributed.all_reduce)
    keep = keep_groups(r, G, cfg.grpo)
    # observations are in the sequence but out of the loss (batch.py); None: every token is the policy's
    loss_masks = [None if env is None else [float(m) for m in mask] for mask in samples.model_mask]
    seqs = [
        Sequence(prompts[idx[samples.prompt_index[j]]].ids, samples.tokens[j], samples.logprobs[j], float(adv[j]),
                 sampler_logp=samples.logprobs[j], group=samples.prompt_index[j], loss_mask=loss_masks[j])
        for j in range(len(texts)) if keep[j]
    ]
    skip_zero_var = int(distributed.all_reduce(torch.tensor(len(seqs)))) == 0  # same answer on every rank
    mbs, metric_sums, mismatch, grad_norms, losses, skipped = [], {}, {}, [], [], 0
    if not skip_zero_var:
        if not seqs:  # this rank's groups were all dropped, another rank's were not: a zero-weight filler
            seqs = [Sequence(prompts[idx[0]].ids, samples.tokens[0], samples.logprobs[0], 0.0, weight=0.0,
                             sampler_logp=samples.logprobs[0], group=0, loss_mask=loss_masks[0])]
        mbs = microbatches(seqs, cfg.micro_batch_size, tokenizer.pad_id, d.device, shared=cfg.shared_prefix)
        norm = loss_norm([mb.mask for mb in mbs], cfg.max_response_len, world_reduce=distributed.all_reduce)
        if ref is not None:
            with torch.no_grad(), ctx:
                for mb in mbs:
                    mb.ref_logp = micro_batch_logprobs(ref, mb, cfg.temperature, tokenizer.vocab_size)[0]
        # pi_old := the trainer's forward (the sampler's log-probs stay in mb.sampler_logp): at ppo_epochs == 1 the
        # update's own forward, detached (no extra forward); otherwise one no-grad forward before the first epoch
        fused = cfg.old_logp_from_update
        if cfg.recompute_old_logp and not fused:
            mismatch = recompute_old_logprobs(policy, mbs, cfg, ctx, tokenizer.vocab_size)
        for _ in range(cfg.ppo_epochs):
            loss_sum, sums = train_on_micro_batches(policy, mbs, norm, cfg, d, ctx, tokenizer.vocab_size, sft=False,
                                                    old_from_policy=fused)
            if fused:
                mismatch = {k: sums.pop(k) for k in list(sums) if k.startswith("mismatch_")}
            grad_norm, loss, ok = optimizer_step(policy, opt, sched, cfg, loss_sum)
            losses.append(loss)  # ~0 at ppo_epochs=1 (rho = 1): watch reward
            grad_norms.append(grad_norm)
            skipped += not ok
            for k, v in sums.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v
    if totals is not None:
        totals["skipped_zero_var"] = totals.get("skipped_zero_var", 0) + skip_zero_var
    t_train = time.time()

    # ---- metrics over all ranks
    lengths = [len(t) for t in samples.tokens]
    local = {
        "n": len(rewards), "reward": sum(x.total for x in rewards), "reward_sq": sum(x.total ** 2 for x in rewards),
        "format": sum(x.format for x in rewards), "execution": sum(x.execution for x in rewards),
        "result": sum(x.result for x in rewards), "length": sum(x.length for x in rewards),
        "correct": sum(x.correct for x in rewards), "gold_error": sum(x.gold_error for x in rewards),
        "len_sum": sum(lengths), "truncated": sum(f == "length" for f in samples.finish_reason),
        "zero_std_groups": adv_stats["frac_zero_std"] * len(idx), "groups": len(idx),
        "rollout_tokens": sum(lengths), "train_tokens": sum(mb.num_tokens for mb in mbs) * cfg.ppo_epochs,
        "obs_tokens": sum(m.count(False) for m in samples.model_mask),
        **(env.stats() if env else {"queries": 0, "querying_rows": 0, "query_errors": 0}),
    }
    tot = reduce_metric_sums(local)
    len_max = int(distributed.all_reduce(torch.tensor(max(lengths)), op="max"))
    n = tot["n"]
    mean = tot["reward"] / n
    record = {
        "stage": "grpo", "step": step + 1, "reward": mean, "reward_std": math.sqrt(max(0.0, tot["reward_sq"] / n - mean**2)),
        "reward_format": tot["format"] / n, "reward_execution": tot["execution"] / n, "reward_result": tot["result"] / n,
        "reward_length": tot["length"] / n, "accuracy": tot["correct"] / n, "gold_errors": int(tot["gold_error"]),
        "frac_zero_std": tot["zero_std_groups"] / tot["groups"], "completion_len_mean": tot["len_sum"] / n,
        "completion_len_max": len_max, "truncation_rate": tot["truncated"] / n,
        "lr": sched.get_last_lr()[0], "skipped": skipped, "skipped_zero_var": int(skip_zero_var),
        "rollout_tokens_per_s": tot["rollout_tokens"] / (t_rollout - t0),
        "train_tokens_per_s": tot["train_tokens"] / (t_train - t_reward),
        "time_rollout": t_rollout - t0, "time_reward": t_reward - t_rollout, "time_train": t_train - t_reward,
    }
    if cfg.max_turns > 0:  # multi-turn: how the rollouts used the database
        record.update(queries_per_completion=tot["queries"] / n, query_rate=tot["querying_rows"] / n,
                      obs_tokens_mean=tot["obs_tokens"] / n, query_errors=tot["query_errors"] / max(tot["queries"], 1))
    if totals is not None:
        record["skipped_zero_var_total"] = totals["skipped_zero_var"]
    if not skip_zero_var:  # policy-update metrics (the skipped step has none: no loss, no gradient)
        record.update(finalize_metrics(reduce_metric_sums(metric_sums)), loss=sum(losses) / len(losses),
                      grad_norm=sum(grad_norms) / len(grad_norms))
    if mismatch:
        record.update(finalize_mismatch(reduce_metric_sums(mismatch)))
    logged = [
        {"step": step + 1, "question": examples[idx[samples.prompt_index[j]]].question, "completion": texts[j],
         "reward": rewards[j].total, "correct": rewards[j].correct}
        for j in range(min(cfg.log_samples, len(texts)))
    ]
    return record, logged


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="Python file defining `config = TrainConfig(...)`")
    ap.add_argument("--resume", nargs="?", const="latest", default=None,
                    help="continue from the newest checkpoint of --out_dir (or from the checkpoint directory given)")
    ap.add_argument("--dry_run", action="store_true",
                    help="simulate one step at full scale on this CPU (fake tensors): memory per phase per GPU")
    ap.add_argument("--gpus", type=int, default=8, help="--dry_run: number of GPUs (ranks) to simulate")
    ap.add_argument("--gpu_mem_gb", type=float, default=80.0, help="--dry_run: memory of one GPU, GiB")
    ap.add_argument("--dry_run_out", default="", help="--dry_run: also write the table to this markdown file")
    return ap.parse_known_args(argv)


def dry_run(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """Print (and optionally write) the dry run's table; exit code 1 when the peak does not fit."""
    from sqlr1 import dryrun

    report = dryrun.dry_run(cfg, args.gpus, args.gpu_mem_gb, log=lambda msg: print(f"dry run: {msg}", file=sys.stderr))
    text = report.markdown(f"dry run: {cfg.name} ({cfg.model}) on {args.gpus} x {args.gpu_mem_gb:g} GiB")
    print(text)
    if args.dry_run_out:
        Path(args.dry_run_out).write_text(text)
    if report.problem:
        raise ValueError(report.problem)
    return 0 if report.fits else 1


def resolve_toy(cfg: TrainConfig) -> TrainConfig:
    """dataset='toy': the config with the toy world's paths, used like Spider (nothing is built here).

    Only the default model (model="": <world>/model_seed<seed>, the run's seed drawing the initial weights) may be
    created; a named model must exist (a local directory, or a Hub repo id).
    """
    root = Path(cfg.data_root or "toyworld")
    if cfg.model:
        try:
            resolve_checkpoint(cfg.model)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--model={cfg.model}: {e}; leave model empty to train the toy world's fresh "
                                    f"model ({root / f'model_seed{cfg.seed}'})") from None
    model = cfg.model or str(root / f"model_seed{cfg.seed}")
    return replace(cfg, dataset="spider", data_root=str(root), model=model)


def prepare_toy(cfg: TrainConfig) -> None:
    """Build the toy world at cfg.data_root (and its default tiny model) if missing; cfg from resolve_toy."""
    from sqlr1.toyworld import ensure_toyworld, init_model

    root = ensure_toyworld(cfg.data_root, seed=0)
    if cfg.model == str(root / f"model_seed{cfg.seed}") and not (Path(cfg.model) / "config.json").exists():
        init_model(cfg.model, root / "tokenizer", seed=cfg.seed)


class Interrupted(Exception):
    """Ctrl-C during a run: where it stopped, for main to print with the command that continues it."""

    def __init__(self, run_dir: Path, stopped: str, resumable: bool):
        super().__init__(stopped)
        self.run_dir, self.stopped, self.resumable = run_dir, stopped, resumable


def rerun_command(argv: list[str], run_dir: Path, world_size: int, resume: bool) -> str:
    """This command line with --out_dir=<run_dir> (and --resume: the command that continues the run)."""
    keep = []
    for i, a in enumerate(argv):
        resume_dir = i > 0 and argv[i - 1] == "--resume" and not a.startswith("-")  # `--resume DIR`
        if not (a == "--resume" or a.startswith(("--resume=", "--out_dir=")) or resume_dir):
            keep.append(a)
    launcher = ["torchrun", f"--nproc_per_node={world_size}"] if world_size > 1 else ["python"]
    return shlex.join([*launcher, sys.argv[0], *keep, f"--out_dir={run_dir}", *(["--resume"] if resume else [])])


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        if cfg.dataset == "toy":  # the toy model's shape is read from its config.json: build the world first
            cfg = resolve_toy(cfg)
            prepare_toy(cfg)
        return dry_run(cfg, args)
    d = distributed.setup(cfg.device, cfg.dist_timeout)
    try:
        code = train(cfg, args.resume, d)
    except Interrupted as e:  # one line instead of a KeyboardInterrupt traceback
        if d.is_main:
            then = "continue with" if e.resumable else "nothing to resume; start over with"
            print(f"\ninterrupted {e.stopped}; {then}: {rerun_command(argv, e.run_dir, d.world_size, e.resumable)}",
                  file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if d.is_main:
            print("\ninterrupted during start-up, before any training step", file=sys.stderr)
        return 130
    except Exception as e:
        if d.world_size == 1:
            raise
        distributed.exit_on_error(d, failure_message(e))  # at once: the other ranks may wait in a collective
    distributed.cleanup()
    return code


def failure_message(e: Exception) -> str:
    """One line for bad input, one line when another rank's failure broke a collective, else the traceback."""
    if isinstance(e, BAD_INPUT):
        return f"error: {e}"
    if isinstance(e, torch.distributed.DistError) or "by peer" in str(e):  # NCCL / gloo: a peer process is gone
        return "stopped: another rank failed (its error is printed above)"
    return "".join(traceback.format_exception(e))


def train(cfg: TrainConfig, resume: str | None, d) -> int:
    """Validate, claim the run directory, then `run` it. Nothing is created before the settings are checked."""
    if cfg.prompts_per_step % d.world_size:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the number of ranks {d.world_size}")
    if resume == "latest" and not cfg.out_dir:
        raise ValueError("--resume needs --out_dir=<run directory> (or --resume=<checkpoint directory>)")
    toy = cfg.dataset == "toy"
    if toy:
        cfg = resolve_toy(cfg)
    ckpt, trainer_state, changes, out_dir = None, {"step": 0, "stage": None}, {}, cfg.out_dir
    if resume:  # the checkpoint and the settings it may continue with are checked before anything is written
        ckpt, run_path = resume_checkpoint(resume, cfg.out_dir)
        out_dir = str(run_path)
        trainer_state = read_trainer_state(ckpt)
        saved = ckpt.parent.parent / "config.json"  # the run that wrote the checkpoint
        if saved.is_file():
            changes = resume_changes(read_json(saved), cfg, trainer_state["step"], trainer_state["stage"], saved)
        elif d.is_main:
            print(f"resume: no config.json next to {ckpt.parent}; the settings were not compared with the run's")
    if toy:  # main rank builds the world, the others wait, then everyone reads it
        if d.is_main:
            prepare_toy(cfg)
        distributed.barrier()
    run_dir = make_run_dir(out_dir, cfg.name)
    cfg = replace(cfg, out_dir=str(run_dir))  # config.json names the directory a resume must give
    lock = lock_run_dir(run_dir) if d.is_main else None  # held until this process ends
    try:
        if d.is_main:
            remove_partial_checkpoints(run_dir)  # a save a kill interrupted: only the lock holder may clean it
        distributed.barrier()
        if not resume and latest_checkpoint(run_dir) is not None:
            raise ValueError(f"{run_dir} already holds a training run: continue it with --resume, or pick a new "
                             "--out_dir")
        if d.is_main:
            if changes:
                record_config_changes(run_dir, trainer_state["step"], changes)
                print("resume: changed " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
                      + f" (recorded in {run_dir / 'config_changes.jsonl'})")
            save_config(cfg, run_dir / "config.json")
        return run(cfg, ckpt, trainer_state, run_dir, d)
    except KeyboardInterrupt:
        removed = [p.name for p in remove_partial_checkpoints(run_dir)] if d.is_main else []
        last, done = latest_checkpoint(run_dir), last_logged_step(run_dir)
        where = f"after step {done} of {cfg.sft_steps + cfg.grpo_steps}" if done else "before the first step"
        saved = f"the last checkpoint is {last.name}" if last else "no checkpoint was saved"
        if removed:
            saved += f"; the unfinished {', '.join(removed)} was removed"
    finally:
        if lock is not None:
            lock.close()
    # raised out here, once the interrupted frames are freed (their progress bar prints its last line first)
    raise Interrupted(run_dir, f"{where} ({saved})", last is not None)


def run(cfg: TrainConfig, ckpt: Path | None, trainer_state: dict, run_dir: Path, d) -> int:
    """The run itself: data, models, the SFT and GRPO steps, evaluations, checkpoints, final/."""
    torch.manual_seed(cfg.seed + d.rank)
    random.seed(cfg.seed + d.rank)

    # ---- data: prompts rendered once (schema from the SQLite file, ChatML, pre-filled <think>)
    compute_dtype = DTYPES[cfg.dtype]
    tokenizer = load_tokenizer(cfg.model)
    extras = source_extras(cfg.model)  # its generation_config.json and config.json keys: every checkpoint keeps them
    template = {"sqlr1": SQLR1_PROMPT, "short": SHORT_PROMPT}[cfg.prompt_template]
    train_examples = load_dataset(cfg.dataset, cfg.data_root, cfg.train_split)
    sft_examples = train_examples
    if cfg.sft_steps and cfg.sft_split and cfg.sft_split != cfg.train_split:  # e.g. a teacher's reasoning traces
        sft_examples = load_dataset(cfg.dataset, cfg.data_root, cfg.sft_split)
    eval_examples = load_dataset(cfg.dataset, cfg.data_root, cfg.eval_split) if cfg.eval_split else []
    if cfg.eval_limit:
        eval_examples = eval_examples[: cfg.eval_limit]

    def prompts(examples):
        return [build_prompt(ex, tokenizer, template, cfg.max_prompt_len, cfg.sample_values) for ex in examples]

    train_prompts, eval_prompts = prompts(train_examples), prompts(eval_examples)
    sft_prompts = train_prompts if sft_examples is train_examples else prompts(sft_examples)

    # ---- models: fp32 master policy (FSDP-sharded when distributed), compute-dtype rollout copy, frozen reference
    sharded = d.world_size > 1
    policy = load_model(cfg.model, dtype=torch.float32, device=d.device)
    check_vocab(tokenizer.vocab_size, policy, cfg.model)
    policy.gradient_checkpointing = cfg.gradient_checkpointing
    if sharded:  # before the next model loads: one full model on the device at a time (dry run: 43 -> 28 GiB at 7B)
        distributed.shard(policy, compute_dtype)
    ref = None
    if cfg.grpo_steps and cfg.grpo.kl_coef > 0:  # beta = 0: no reference model at all
        ref = load_model(cfg.model, dtype=compute_dtype, device=d.device).requires_grad_(False)
        if sharded:
            distributed.shard(ref, compute_dtype, trainable=False)
    rollout_model = policy
    if sharded or compute_dtype != torch.float32:
        rollout_model = load_model(cfg.model, dtype=compute_dtype, device=d.device)
        distributed.free_weights(rollout_model)  # allocated by copy_full_weights before each use
    ctx = compute_context(d.device, compute_dtype, sharded)
    gc.freeze()  # start-up objects (torch, models, prompts) never need scanning: no 50-80 ms full GCs per step

    total = cfg.sft_steps + cfg.grpo_steps
    start = trainer_state["step"]
    log = MetricsLog(run_dir, d.is_main, resume_step=start if ckpt else None, wandb_project=cfg.wandb_project,
                     config=config_dict(cfg))
    workers = cfg.sandbox_workers or distributed.cores_per_local_rank()
    with Sandbox(num_workers=workers, timeout=cfg.reward.timeout) as sandbox:
        rl_examples, rl_prompts = [], []
        if cfg.grpo_steps:  # drop prompts that are too long and golds that fail, time out or return nothing
            kept, counts = shared_rl_filter(train_examples, train_prompts, sandbox, cfg, d)
            if d.is_main:
                print(f"RL data: kept {len(kept)} of {len(train_examples)} examples; dropped {counts}")
            if not kept:
                raise ValueError("no training example survived the RL filters (see the counts above)")
            rl_examples, rl_prompts = [train_examples[i] for i in kept], [train_prompts[i] for i in kept]

        def run_eval(step: int, stage: str) -> None:
            """Held-out EX, greedy and voted (eval_vote="final": greedy only before the last step); logged with the
            number of completed steps."""
            if not eval_examples:
                return
            if rollout_model is not policy:
                distributed.copy_full_weights(policy, rollout_model)
            greedy_only = cfg.eval_vote == "final" and step != total
            res = evaluate_policy(rollout_model, tokenizer, eval_examples, eval_prompts, sandbox,
                                  replace(cfg, eval_n=1) if greedy_only else cfg, d)
            if greedy_only:
                del res["ex_voted"]  # not measured (eval_n=1 would report greedy as voted)
            if rollout_model is not policy:
                distributed.free_weights(rollout_model)
            log.log({"stage": f"eval:{stage}", "step": step, **res})
            if d.is_main:
                tqdm.write(f"eval after {stage} (step {step}): " + " ".join(f"{k}={v:.3f}" for k, v in res.items()))

        if start == 0 and cfg.sft_steps == 0 and cfg.grpo_steps and cfg.eval_init:
            run_eval(0, "init")
        stage, opt, sched, bad = None, None, None, 0
        totals = {"skipped_zero_var": trainer_state.get("skipped_zero_var", 0)}  # over the run, resumes included
        bar = tqdm(total=total, initial=start, desc="train", disable=not d.is_main, dynamic_ncols=True)
        for step in range(start, total):
            if (want := "sft" if step < cfg.sft_steps else "grpo") != stage:  # new stage: new optimizer
                stage = want
                lr, n_opt = (cfg.sft_lr, cfg.sft_steps) if stage == "sft" else (cfg.lr, cfg.grpo_steps * cfg.ppo_epochs)
                opt, sched = make_optimizer(policy, cfg, lr, n_opt)
                if ckpt is not None and step == start:
                    same = trainer_state["stage"] == stage  # optimizer state only continues within a stage
                    load_checkpoint(ckpt, policy, opt if same else None, d)
                    if same:
                        sched.load_state_dict(trainer_state["scheduler"])
            if stage == "sft":
                record = sft_step(step, policy, opt, sched, sft_examples, sft_prompts, tokenizer, cfg, d, ctx)
                logged = []
            else:
                record, logged = grpo_step(step, policy, rollout_model, ref, opt, sched, rl_examples, rl_prompts,
                                           tokenizer, sandbox, cfg, d, ctx, totals)
            log.log(record)
            log.samples(logged)
            bar.update(1)
            bar.set_postfix_str(_postfix(record))
            bad = bad + 1 if record["skipped"] else 0
            if bad >= cfg.max_bad_steps:
                raise RuntimeError(f"{bad} consecutive steps had a non-finite loss or gradient norm (last: step "
                                   f"{step + 1}); lower the learning rate or check the data — see {log.metrics_path}")
            done = step + 1
            grpo_done = done - cfg.sft_steps
            if done == total or (done == cfg.sft_steps and cfg.grpo_steps) or (
                stage == "grpo" and cfg.eval_every and grpo_done % cfg.eval_every == 0
            ):
                run_eval(done, stage if done in (total, cfg.sft_steps) else f"grpo@{grpo_done}")
            if done == total or (cfg.save_every and done % cfg.save_every == 0):
                state = {"step": done, "stage": stage, "scheduler": sched.state_dict(), **totals}
                save_checkpoint(run_dir, done, policy, opt, state, tokenizer, d, compute_dtype, model_files={
                    "sqlr1_prompt.json": {"template": cfg.prompt_template, "sample_values": cfg.sample_values}},
                    source=extras)
                if d.is_main:
                    prune_checkpoints(run_dir, cfg.keep_last)
        bar.close()
    if d.is_main:
        last = latest_checkpoint(run_dir)
        if last is not None:
            promote_final(last / "model", run_dir / "final")
        print_summary(read_evals(run_dir))
        plot_metrics(run_dir)
        print(f"run directory: {run_dir}  final model: {run_dir / 'final'}")
        if eval_examples and (run_dir / "final").is_dir():
            print("ask the final model a held-out question:\n  "
                  + sample_command(run_dir / "final", eval_examples[0], cfg.max_response_len))
    return 0


def _postfix(record: dict) -> str:
    keys = ("loss", "reward", "accuracy", "grad_norm") if record["stage"] == "grpo" else ("loss", "grad_norm")
    return " ".join(f"{k}={record[k]:.3g}" for k in keys if k in record)


def sample_command(model_dir: Path, example: Example, max_new_tokens: int) -> str:
    """A ready-to-run `sample.py` command line (quoted for a POSIX shell) asking `model_dir` one question."""
    def path(p) -> str:  # relative to the working directory when inside it, like the rest of the run's paths
        p = Path(p).absolute()
        return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)

    words = [path(sys.executable), path(Path(__file__).with_name("sample.py")), "--model", str(model_dir),
             "--db", str(example.db_path), "--question", example.question]
    if example.evidence:
        words += ["--evidence", example.evidence]
    return shlex.join(words + ["--max-new-tokens", str(max_new_tokens)])


def print_summary(evals: list[dict]) -> None:
    """The final table: one row per evaluation."""
    if not evals:
        return
    print(f"\n{'stage':<16} {'step':>5} {'EX greedy':>10} {'EX voted':>9} {'format ok':>10} {'mean reward':>12}")
    for e in evals:
        voted = f"{e['ex_voted']:>9.3f}" if "ex_voted" in e else f"{'-':>9}"  # eval_vote="final": greedy only
        print(f"{e['stage'].removeprefix('eval:'):<16} {e['step']:>5} {e['ex_greedy']:>10.3f} {voted} "
              f"{e['format_ok']:>10.3f} {e['mean_reward']:>12.3f}")


BAD_INPUT = (FileNotFoundError, FileExistsError, ValueError)

if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BAD_INPUT as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
