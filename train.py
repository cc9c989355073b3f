"""Train SQL-R1: an optional supervised cold start, then GRPO on execution rewards.

    python train.py --config configs/grpo_tiny.py                      # the toy world on a CPU, in minutes
    torchrun --nproc_per_node=8 train.py --config configs/grpo_7b.py   # the paper's recipe on 8 GPUs
    python train.py --config configs/grpo_tiny.py --out_dir=runs/x --resume   # continue a stopped run

Steps [0, sft_steps) are SFT: cross-entropy on the responses of a teacher's traces. Steps [sft_steps, sft_steps +
grpo_steps) are GRPO (SQL-R1, Sec. 3), each on B prompts:
    1. rollout:    G completions per prompt from pi_theta, this step's weights (on-policy)
    2. reward:     execute each completion's SQL in the sandbox: r = S_f + S_e + S_r + S_l
    3. advantages: A_i = (r_i - mean(r_group)) / (std(r_group) + eps)
    4. update:     the clipped objective + beta KL(pi_theta || pi_ref), one AdamW step per pass over the batch
Held-out execution accuracy (greedy and voted) is measured after SFT, every eval_every GRPO steps and at the end.
"""

from __future__ import annotations

import gc
import math
import random
import sys
import time
from dataclasses import dataclass

import torch

from sqlr1 import distributed, launch
from sqlr1.batch import TrainSequence
from sqlr1.checkpoint import check_vocab, load_model
from sqlr1.config import DTYPES, TrainConfig
from sqlr1.data import PROMPT_TEMPLATES, Example, Prompt, build_prompt, filter_for_rl, load_dataset, sft_response
from sqlr1.distributed import Dist, Models
from sqlr1.grpo import group_advantages, train_rows
from sqlr1.inference import evaluate_policy
from sqlr1.reward import Reward, score_batch
from sqlr1.run import Phases, Run
from sqlr1.sampling import SamplingParams
from sqlr1.sandbox import Sandbox
from sqlr1.sql_env import Episodes, SqlEnv, encode_with_observations, episode_metrics
from sqlr1.tokenizer import load_tokenizer
from sqlr1.update import Optimizer, new_optimizer, policy_update, sft_update


@dataclass
class Split:
    """Examples with their rendered prompts (ChatML, schema from the SQLite file, pre-filled <think>)."""

    examples: list[Example]
    prompts: list[Prompt]

    def select(self, indices: list[int]) -> Split:
        return Split([self.examples[i] for i in indices], [self.prompts[i] for i in indices])


def train(cfg: TrainConfig, run: Run) -> None:
    """The recipe: data -> models -> SFT and GRPO steps -> evaluations and checkpoints -> final/."""
    d = run.dist
    torch.manual_seed(cfg.seed + d.rank)
    random.seed(cfg.seed + d.rank)
    tokenizer = load_tokenizer(cfg.model)
    train_split = load_split(cfg, tokenizer, cfg.train_split)
    sft_split = train_split if cfg.sft_split in ("", cfg.train_split) or not cfg.sft_steps else \
        load_split(cfg, tokenizer, cfg.sft_split)
    eval_split = load_split(cfg, tokenizer, cfg.eval_split, cfg.eval_limit) if cfg.eval_split else Split([], [])

    def load(dtype: torch.dtype):  # the policy, the reference and the rollout copy each come from cfg.model
        model = load_model(cfg.model, dtype=dtype, device=d.device)
        check_vocab(tokenizer.vocab_size, model, cfg.model)
        return model

    models = distributed.build_models(cfg, d, load)
    gc.freeze()  # start-up objects (torch, models, prompts) never need scanning: no 50-80 ms full GCs per step
    total = cfg.sft_steps + cfg.grpo_steps
    with Sandbox(num_workers=cfg.sandbox_workers or distributed.cores_per_local_rank(), timeout=cfg.reward.timeout) as sandbox:
        env = SqlEnv(sandbox, tokenizer, cfg.max_turns, cfg.obs_rows, cfg.obs_max_tokens, cfg.reward.timeout)
        rl_split = rl_data(train_split, sandbox, cfg, d) if cfg.grpo_steps else Split([], [])

        def evaluate(step: int, label: str) -> None:  # held-out EX, voted too unless eval_vote="final" and not the end
            if eval_split.examples:
                phases = Phases(d.device)
                with phases("eval"), distributed.rollout_weights(models) as model:
                    result = evaluate_policy(env, model, eval_split.examples, eval_split.prompts, cfg, d,
                                             vote=cfg.eval_vote == "always" or step == total)
                run.log({"stage": f"eval:{label}", "step": step, **result, "time": phases.seconds["eval"],
                         **phases.peaks()})

        if run.start_step == 0 and cfg.sft_steps == 0 and cfg.grpo_steps and cfg.eval_init:
            evaluate(0, "init")
        optimizer = None
        for step in range(run.start_step, total):
            stage = "sft" if step < cfg.sft_steps else "grpo"
            if optimizer is None or optimizer.stage != stage:  # each stage has its own AdamW and schedule
                optimizer = new_optimizer(models.policy, cfg, stage)
                run.start(models.policy, optimizer)  # a resumed run's checkpoint loads here
            if stage == "sft":
                run.log(sft_step(step, models, optimizer, sft_split, tokenizer, cfg, d))
            else:
                run.log(*grpo_step(step, models, optimizer, rl_split, env, cfg, d))
            done, grpo_done = step + 1, step + 1 - cfg.sft_steps
            if done == total or (done == cfg.sft_steps and cfg.grpo_steps):
                evaluate(done, stage)
            elif stage == "grpo" and cfg.eval_every and grpo_done % cfg.eval_every == 0:
                evaluate(done, f"grpo@{grpo_done}")
            if done == total or (cfg.save_every and done % cfg.save_every == 0):
                run.save(done, models.policy, optimizer, tokenizer, DTYPES[cfg.dtype])
    run.finish(eval_split.examples[0] if eval_split.examples else None)


def load_split(cfg: TrainConfig, tokenizer, split: str, limit: int = 0) -> Split:
    examples = load_dataset(cfg.dataset, cfg.data_root, split)[: limit or None]
    template = PROMPT_TEMPLATES[cfg.prompt_template]
    return Split(examples, [build_prompt(ex, tokenizer, template, cfg.max_prompt_len, cfg.sample_values)
                            for ex in examples])


def rl_data(split: Split, sandbox: Sandbox, cfg: TrainConfig, d: Dist) -> Split:
    """The examples GRPO can learn from (the prompt fits, the gold runs and returns rows), chosen on rank 0 and
    broadcast: every rank must hold the same list, since `step_indices` picks a rank's prompts by position."""
    kept = None
    if d.is_main:
        kept, dropped = filter_for_rl(split.examples, split.prompts, sandbox, cfg.max_prompt_len,
                                      drop_empty_gold=cfg.drop_empty_gold, timeout=cfg.reward.timeout)
        print(f"RL data: kept {len(kept)} of {len(split.examples)} examples; dropped {dropped}")
    kept = distributed.broadcast_object(kept)
    if not kept:
        raise ValueError("no training example survived the RL filters (see the counts above)")
    return split.select(kept)


def step_indices(num_examples: int, per_step: int, step: int, seed: int) -> list[int]:
    """The examples of `step`: a fresh seeded shuffle each epoch, consumed in order. Depends only on (step, seed), so a
    resumed run sees exactly the batches the uninterrupted run would have."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, num_examples)
        order = list(range(num_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[pos])
    return out


def rank_batch(split: Split, per_step: int, step: int, cfg: TrainConfig, d: Dist) -> Split:
    """This rank's per_step / world_size examples of the step's per_step."""
    per_rank = per_step // d.world_size
    return split.select(step_indices(len(split.examples), per_step, step, cfg.seed)[d.rank * per_rank:][:per_rank])


def sft_step(step: int, models: Models, optimizer: Optimizer, split: Split, tokenizer, cfg: TrainConfig,
             d: Dist) -> dict:
    """One cold-start SFT step: cross-entropy on the response tokens (the prompt, and the observations of multi-turn
    traces, masked out), the response cut to max_response_len with the stop token last."""
    t0 = time.time()
    batch, seqs = rank_batch(split, cfg.sft_batch_size * d.world_size, step, cfg, d), []
    for example, prompt in zip(batch.examples, batch.prompts):
        ids, own = encode_with_observations(tokenizer, sft_response(example), cfg.obs_max_tokens)
        n = cfg.max_response_len - 1
        seqs.append(TrainSequence(prompt.ids, ids[:n] + [tokenizer.eos_ids[0]],
                                  loss_mask=None if all(own) else own[:n] + [1.0]))
    stats = sft_update(models, optimizer, seqs, tokenizer, cfg, d)
    dt = time.time() - t0
    return {"stage": "sft", "step": step + 1, "loss": stats["loss"], "grad_norm": stats["grad_norm"],
            "lr": stats["lr"], "skipped": stats["skipped"], "train_tokens_per_s": stats["train_tokens"] / dt, "time": dt}


def grpo_step(step: int, models: Models, optimizer: Optimizer, split: Split, env: SqlEnv, cfg: TrainConfig,
              d: Dist) -> tuple[dict, list[dict]]:
    """One GRPO step on this rank's B / world_size prompts (a group never crosses ranks): the record, logged samples."""
    phases = Phases(d.device)
    batch = rank_batch(split, cfg.prompts_per_step, step - cfg.sft_steps, cfg, d)
    G, tokenizer = cfg.group_size, env.tokenizer
    # 1. rollout: G completions per prompt, sampled with this step's weights
    with phases("rollout"), distributed.rollout_weights(models) as model:
        episodes = env.rollout(model, [p.ids for p in batch.prompts], [ex.db_path for ex in batch.examples], G,
                               SamplingParams(cfg.max_response_len, cfg.temperature, cfg.top_p, cfg.top_k,
                                              tokenizer.eos_ids, tokenizer.vocab_size,
                                              seed=(cfg.seed * 1_000_003 + step) * 1009 + d.rank,
                                              compile=cfg.compile_decode(d.device)))
    # 2. reward: execute each completion's SQL against its gold; r = SQL-R1's reward - query_cost x queries run
    with phases("reward"):
        golds = [(str(batch.examples[p].db_path), batch.examples[p].sql) for p in episodes.samples.prompt_index]
        rewards = score_batch(env.sandbox, episodes.texts, golds, cfg.reward, count_tokens=lambda s: len(tokenizer.encode(s)))
    r = torch.tensor([x.total - cfg.query_cost * episodes.queries(j) for j, x in enumerate(rewards)])
    # 3. advantages, and the completions the update trains on (all, or DAPO's informative groups)
    advantages, adv_stats = group_advantages(r, G, cfg.grpo, world_reduce=distributed.all_reduce)
    rows, weights = train_rows(r, G, cfg.grpo, world_reduce=distributed.all_reduce)
    seqs = [TrainSequence(batch.prompts[episodes.samples.prompt_index[j]].ids, episodes.samples.tokens[j],
                          episodes.loss_mask(j), float(advantages[j]), w, episodes.samples.logprobs[j],
                          group=episodes.samples.prompt_index[j]) for j, w in zip(rows, weights)]
    # 4. update: the clipped objective + beta KL, backpropagated over the step's micro-batches; one AdamW step
    with phases("train"):
        update = policy_update(models, optimizer, seqs, tokenizer, cfg, d, phases=phases)
    record = grpo_metrics(step, rewards, episodes, adv_stats, update, optimizer.lr, phases)
    logged = [{"step": step + 1, "question": batch.examples[episodes.samples.prompt_index[j]].question,
               "completion": episodes.transcripts[j], "reward": rewards[j].total, "correct": rewards[j].correct}
              for j in range(min(cfg.log_samples, len(rewards)))]
    return record, logged


def grpo_metrics(step: int, rewards: list[Reward], episodes: Episodes, adv_stats: dict, update: dict | None,
                 lr: float, phases: Phases) -> dict:
    """The step's record, over all ranks: rewards and their components, accuracy, completion lengths, the update's
    metrics (none when nothing was trained: `skipped_zero_var`), throughput and time per phase."""
    lengths = [len(t) for t in episodes.samples.tokens]
    local = {"n": len(rewards), "reward": sum(x.total for x in rewards), "reward_sq": sum(x.total ** 2 for x in rewards),
             **{k: sum(getattr(x, k) for x in rewards) for k in ("format", "execution", "result", "length", "correct",
                                                                 "gold_error")},
             "len_sum": sum(lengths), "truncated": episodes.samples.finish_reason.count("length"),
             "zero_std_groups": adv_stats["frac_zero_std"] * len(set(episodes.samples.prompt_index)),
             "groups": len(set(episodes.samples.prompt_index)), **episodes.stats()}
    tot = distributed.reduce_sums(local)
    n, mean = tot["n"], tot["reward"] / tot["n"]
    record = {"stage": "grpo", "step": step + 1, "reward": mean, "reward_std": math.sqrt(max(0.0, tot["reward_sq"] / n - mean**2)),
              **{f"reward_{k}": tot[k] / n for k in ("format", "execution", "result", "length")},
              "accuracy": tot["correct"] / n, "gold_errors": int(tot["gold_error"]),
              "frac_zero_std": tot["zero_std_groups"] / tot["groups"], "completion_len_mean": tot["len_sum"] / n,
              "completion_len_max": int(distributed.all_reduce(torch.tensor(max(lengths)), op="max")),
              "truncation_rate": tot["truncated"] / n, "lr": lr, "skipped": update["skipped"] if update else 0,
              "skipped_zero_var": int(update is None),
              "rollout_tokens_per_s": tot["len_sum"] / phases.seconds["rollout"],
              "train_tokens_per_s": (update["train_tokens"] if update else 0.0) / phases.seconds["train"],
              **{f"time_{k}": phases.seconds[k] for k in ("rollout", "reward", "train")}, **phases.peaks(),
              **episode_metrics({k: tot[k] for k in episodes.stats()}, n)}
    if update is not None:
        record.update({k: v for k, v in update.items() if k not in ("skipped", "train_tokens")})
    return record


def main(argv: list[str]) -> int:
    return launch.main(argv, train, __doc__)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except launch.BAD_INPUT as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
