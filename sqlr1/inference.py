"""Answering questions with execution-grounded self-consistency, and held-out execution accuracy.

SQL-R1 inference (Sec. 3.3): sample N candidates at temperature T (N = 8, T = 0.8), parse the SQL out of each
`<answer>`, execute all of them, group the candidates that ran by their result, compared as the evaluator compares
(`sqlr1.evaluate.vote`: in order when the SQL has ORDER BY), and answer with the first SQL of the largest group.
N = 1 or T = 0 is greedy decoding. sample.py and train.py's evaluations both use it, so the numbers a training run
logs are the numbers sample.py reproduces. In a multi-turn environment each candidate may query its database
inside its reasoning first (sqlr1/sql_env.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from sqlr1 import distributed
from sqlr1.evaluate import score_pairs, vote
from sqlr1.reward import parse_response, score_batch
from sqlr1.sampling import SamplingParams
from sqlr1.sandbox import ExecResult
from sqlr1.sql_env import SqlEnv, Turn


@dataclass
class Answer:
    sql: str  # the chosen SQL ("" when no candidate produced any)
    response: str  # the chosen candidate's own text (reasoning + answer)
    result: ExecResult | None  # its execution result
    votes: int  # size of the winning group
    num_valid: int  # candidates whose SQL executed
    candidates: list[str]  # every completion, in sampling order
    turns: list[Turn]  # the chosen candidate's queries and observations ([] in single turn)


@torch.no_grad()
def answer(env: SqlEnv, model, prompts: list[list[int]], db_paths: list[str], n: int, params: SamplingParams,
           mode: str = "spider", progress: bool | None = None) -> list[Answer]:
    """Answer each prompt: n candidates (greedy when n = 1 or temperature 0) -> execute all in one sandbox call ->
    vote by result under `mode`'s rules (a candidate without SQL cannot vote)."""
    if n < 1:
        raise ValueError(f"n={n}: the number of candidates must be >= 1")
    if len(db_paths) != len(prompts):
        raise ValueError(f"answer: {len(prompts)} prompts but {len(db_paths)} db_paths; pass one database per prompt")
    if n == 1 or params.temperature == 0:
        n, params = 1, replace(params, temperature=0.0)
    episodes = env.rollout(model, prompts, db_paths, n, params, progress=progress)
    sqls = [parse_response(t).sql or "" for t in episodes.texts]
    results = env.sandbox.execute_many([(db_paths[p], sql) for p, sql in zip(episodes.samples.prompt_index, sqls)],
                                       timeout=env.timeout)
    answers = []
    for i in range(len(prompts)):
        js = range(i * n, (i + 1) * n)
        v = vote([(sqls[j], results[j] if sqls[j] else ExecResult("error", [], 0, "no SQL in the answer", False))
                  for j in js], mode)
        j = i * n + v.index
        answers.append(Answer(sqls[j], episodes.texts[j], results[j] if sqls[j] else None, v.votes, v.num_valid,
                              [episodes.texts[k] for k in js], episodes.turns[j]))
    return answers


def answer_in_batches(env: SqlEnv, model, prompts: list[list[int]], db_paths: list[str], n: int,
                      params: SamplingParams, mode: str = "spider", batch_size: int = 0,
                      desc: str | None = None) -> list[Answer]:
    """`answer` over consecutive batches of `batch_size` prompts (0: all in one call), so one generate call holds at
    most batch_size * n rows and its KV cache stays bounded. The batch starting at prompt s is sampled with seed
    params.seed + s (None: unseeded): results depend on (seed, batch_size) only (greedy on neither, up to float
    rounding). `desc`:
    a progress bar over batches with that label."""
    if batch_size < 0:
        raise ValueError(f"batch_size={batch_size}: must be >= 0 (0: all prompts in one generate call)")
    size = batch_size or max(len(prompts), 1)
    answers: list[Answer] = []
    for start in tqdm(range(0, len(prompts), size), desc=desc, unit="batch", disable=desc is None):
        answers += answer(env, model, prompts[start : start + size], db_paths[start : start + size], n,
                          replace(params, seed=None if params.seed is None else params.seed + start), mode,
                          progress=False)
    return answers


def evaluate_policy(env: SqlEnv, model, examples, prompts, cfg, d=None, vote: bool = True) -> dict[str, float]:
    """Held-out execution accuracy of greedy decoding and (vote) of eval_n-candidate voting, with the greedy answers'
    format rate and mean reward. Each rank takes every world_size-th example in batches of eval_batch_size prompts
    (the voted pass: x eval_n rows); the counts are summed over ranks."""
    rank, world = (d.rank, d.world_size) if d is not None else (0, 1)
    mine = list(range(rank, len(examples), world))
    ids, dbs, golds = [prompts[i].ids for i in mine], [str(examples[i].db_path) for i in mine], [examples[i].sql for i in mine]
    voting = vote and cfg.eval_n > 1
    local = torch.zeros(5, dtype=torch.float64)  # a rank with no examples (fewer than ranks) still joins the sum
    if mine:
        params = SamplingParams(max_new_tokens=cfg.max_response_len, temperature=0.0, stop_ids=env.tokenizer.eos_ids,
                                vocab_size=env.tokenizer.vocab_size, seed=cfg.seed,
                                compile=cfg.compile_decode(d.device if d is not None else torch.device("cpu")))
        runs = {"greedy": (1, params)}
        if voting:
            runs["voted"] = (cfg.eval_n, replace(params, temperature=cfg.eval_temperature))
        matches = {}
        for name, (n, p) in runs.items():
            answers = answer_in_batches(env, model, ids, dbs, n, p, cfg.reward.mode, cfg.eval_batch_size)
            matches[name] = [v.match for v in score_pairs(env.sandbox, [a.sql for a in answers], golds, dbs,
                                                          mode=cfg.reward.mode, timeout=cfg.reward.timeout)]
            if name == "greedy":
                rewards = score_batch(env.sandbox, [a.response for a in answers], list(zip(dbs, golds)), cfg.reward)
        local = torch.tensor([len(mine), sum(matches["greedy"]), sum(matches.get("voted", matches["greedy"])),
                              sum(r.format > 0 for r in rewards), sum(r.total for r in rewards)], dtype=torch.float64)
    n, g, v, f, r = distributed.all_reduce(local).tolist()
    n = max(n, 1)
    out = {"ex_greedy": g / n, "ex_voted": v / n, "format_ok": f / n, "mean_reward": r / n}
    if not vote:
        del out["ex_voted"]  # not measured
    return out
