"""Answering questions with execution-grounded self-consistency, and held-out execution accuracy.

SQL-R1 inference (Sec. 3.3): sample N candidates at temperature T (N = 8, T = 0.8), parse the SQL out of each
`<answer>`, execute all of them, group the candidates that ran by their result, compared as the evaluator compares
(`sqlr1.evaluate.vote`: in order when the SQL has ORDER BY), and answer with the first SQL of the largest group.
N = 1 or T = 0 is greedy decoding. Used by sample.py and by train.py's evaluations, so the numbers a training run
logs are the numbers sample.py reproduces. With max_turns > 0 each candidate is a multi-turn episode
(`generate_episodes`, sqlr1/sql_env.py): it may query the database inside its reasoning before it answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sqlr1 import distributed
from sqlr1.evaluate import score_pairs, vote
from sqlr1.reward import parse_response, score_batch
from sqlr1.sampling import Samples, generate
from sqlr1.sandbox import ExecResult, Sandbox
from sqlr1.sql_env import SqlEnv, Turn, model_text, pause_ids


@dataclass
class Answer:
    sql: str  # the chosen SQL ("" when no candidate produced any)
    response: str  # the chosen candidate's full completion (reasoning + answer)
    result: ExecResult | None  # its execution result
    votes: int  # size of the winning group
    num_valid: int  # candidates whose SQL executed
    candidates: list[str]  # every completion, in sampling order
    turns: list[Turn] | None = None  # the chosen candidate's queries and observations (multi-turn)


def completion_text(tokenizer, ids: list[int]) -> str:
    """Decoded completion without its stop token (special tokens kept: <think>/<answer> may be special tokens)."""
    if ids and ids[-1] in tokenizer.eos_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def generate_episodes(model, tokenizer, prompts: list[list[int]], db_paths: list[str], sandbox: Sandbox,
                      num_samples: int, max_turns: int = 0, obs_rows: int = 5, obs_max_tokens: int = 128,
                      timeout: float | None = None, **kwargs) -> tuple[Samples, SqlEnv | None]:
    """`sampling.generate` (kwargs go to it), and with max_turns > 0 multi-turn episodes: the sampler pauses rows
    on `sql_env.pause_ids` and `SqlEnv` answers their queries against db_paths[prompt]. Returns (samples, the
    environment holding each row's turns, or None in single turn)."""
    if max_turns == 0:
        return generate(model, prompts, num_samples=num_samples, **kwargs), None
    env = SqlEnv(sandbox, tokenizer, [str(db_paths[i]) for i in range(len(prompts)) for _ in range(num_samples)],
                 max_turns=max_turns, row_limit=obs_rows, max_obs_tokens=obs_max_tokens,
                 timeout=sandbox.timeout if timeout is None else timeout)
    samples = generate(model, prompts, num_samples=num_samples, pause_ids=pause_ids(tokenizer), on_pause=env.on_pause,
                       **kwargs)
    return samples, env


@torch.no_grad()
def answer(
    model,
    tokenizer,
    prompts: list[list[int]],
    db_paths: list[str],
    sandbox: Sandbox,
    n: int = 8,
    temperature: float = 0.8,
    max_new_tokens: int = 2048,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool | None = None,
    timeout: float | None = None,
    mode: str = "spider",
    max_turns: int = 0,
    obs_rows: int = 5,
    obs_max_tokens: int = 128,
    compile: bool = False,
) -> list[Answer]:
    """Answer each prompt: N candidates -> execute all in one sandbox call -> vote by result under `mode`'s rules.
    max_turns > 0: each candidate may query the database first (`generate_episodes`); the SQL is read from the
    model's own text (observations left out)."""
    if n < 1:
        raise ValueError(f"n={n}: the number of candidates must be >= 1")
    if len(db_paths) != len(prompts):
        raise ValueError(f"answer: {len(prompts)} prompts but {len(db_paths)} db_paths; pass one database per prompt")
    greedy = n == 1 or temperature == 0
    n = 1 if greedy else n
    samples, env = generate_episodes(
        model, tokenizer, prompts, db_paths, sandbox, n, max_turns, obs_rows, obs_max_tokens, timeout,
        max_new_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
        top_p=top_p, stop_ids=tokenizer.eos_ids, vocab_size=tokenizer.vocab_size, seed=seed, progress=progress,
        compile=compile,
    )
    texts = [model_text(tokenizer, t, m) for t, m in zip(samples.tokens, samples.model_mask)]
    sqls = [parse_response(t).sql or "" for t in texts]
    to_run = [(db_paths[p], sql) for p, sql in zip(samples.prompt_index, sqls)]
    results = sandbox.execute_many(to_run, timeout=timeout)
    answers = []
    for i in range(len(prompts)):
        js = range(i * n, (i + 1) * n)
        # a candidate without SQL cannot vote: give it an error result
        cands = [(sqls[j], results[j] if sqls[j] else ExecResult("error", [], 0, "no SQL in the answer", False)) for j in js]
        v = vote(cands, mode)
        j = i * n + v.index
        answers.append(Answer(sqls[j], texts[j], results[j] if sqls[j] else None, v.votes, v.num_valid,
                              [texts[k] for k in js], env.turns[j] if env else None))
    return answers


def answer_in_batches(
    model, tokenizer, prompts: list[list[int]], db_paths: list[str], sandbox: Sandbox, batch_size: int = 0,
    seed: int = 0, desc: str | None = None, **kwargs,
) -> list[Answer]:
    """`answer` over consecutive batches of `batch_size` prompts (0: all in one call), so one generate call holds at
    most batch_size * n rows and its static KV cache rows x (L + max_new_tokens - 1) columns stays bounded.

    Seeds: the batch starting at prompt s is sampled with seed + s, so results depend on (seed, batch_size) and
    not on anything else; batch_size 0 is the one call with `seed`. Greedy decoding uses no random numbers: its
    answers are the same for every batch_size (up to float rounding, see sqlr1.sampling). `desc`: a progress bar
    over batches with that label (None: no bar). Other keyword arguments go to `answer`.
    """
    if batch_size < 0:
        raise ValueError(f"batch_size={batch_size}: must be >= 0 (0: all prompts in one generate call)")
    size = batch_size or max(len(prompts), 1)
    answers: list[Answer] = []
    for start in tqdm(range(0, len(prompts), size), desc=desc, unit="batch", disable=desc is None):
        batch = slice(start, start + size)
        answers += answer(model, tokenizer, prompts[batch], db_paths[batch], sandbox, seed=seed + start,
                          progress=False, **kwargs)
    return answers


def evaluate_policy(model, tokenizer, examples, prompts, sandbox: Sandbox, cfg, d=None) -> dict[str, float]:
    """Held-out execution accuracy of greedy decoding and of N-candidate voting, plus greedy format rate and reward.

    With several ranks each evaluates every world_size-th example and the counts are summed. Each rank samples its
    prompts in batches of `cfg.eval_batch_size` (the voted pass: eval_batch_size * eval_n rows per generate call),
    seeded as `answer_in_batches` says.
    """
    rank, world = (d.rank, d.world_size) if d is not None else (0, 1)
    mine = list(range(rank, len(examples), world))
    exs = [examples[i] for i in mine]
    ids = [prompts[i].ids for i in mine]
    dbs = [str(ex.db_path) for ex in exs]
    golds = [ex.sql for ex in exs]
    local = torch.zeros(5, dtype=torch.float64)  # a rank with no examples (fewer than ranks) still joins the sum
    if exs:
        common = dict(max_new_tokens=cfg.max_response_len, timeout=cfg.reward.timeout, seed=cfg.seed,
                      mode=cfg.reward.mode, batch_size=cfg.eval_batch_size, max_turns=cfg.max_turns,
                      obs_rows=cfg.obs_rows, obs_max_tokens=cfg.obs_max_tokens,
                      compile=cfg.compile_decode(d.device if d is not None else torch.device("cpu")))
        greedy = answer_in_batches(model, tokenizer, ids, dbs, sandbox, n=1, **common)
        voted = greedy if cfg.eval_n <= 1 else answer_in_batches(model, tokenizer, ids, dbs, sandbox, n=cfg.eval_n,
                                                                 temperature=cfg.eval_temperature, **common)
        mode = cfg.reward.mode
        ex_g = score_pairs(sandbox, [a.sql for a in greedy], golds, dbs, mode=mode, timeout=cfg.reward.timeout)
        ex_v = ex_g if voted is greedy else score_pairs(sandbox, [a.sql for a in voted], golds, dbs, mode=mode,
                                                        timeout=cfg.reward.timeout)
        rewards = score_batch(sandbox, [a.response for a in greedy], list(zip(dbs, golds)), cfg.reward)
        local = torch.tensor([
            len(exs), sum(v.match for v in ex_g), sum(v.match for v in ex_v),
            sum(r.format > 0 for r in rewards), sum(r.total for r in rewards),
        ], dtype=torch.float64)
    n, g, v, f, r = distributed.all_reduce(local).tolist()
    n = max(n, 1)
    return {"ex_greedy": g / n, "ex_voted": v / n, "format_ok": f / n, "mean_reward": r / n}
