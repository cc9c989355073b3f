"""Cost of multi-turn rollouts: one GRPO rollout batch of the toy world, single turn vs multi-turn, same model.

    python benchmarks/bench_multiturn.py --model runs/<run>/final [--data_root toyworld] [--prompts 8 --group 8]

Both sides sample the same prompts (lookup questions of train_tools, where a tools-trained model queries) with the
same seed, temperature 1 and max_new_tokens, in the same process, alternating, `--repeats` times each; it prints the
median time per rollout batch, the ratio, tokens per completion and how the multi-turn side used the database.
Both are `SqlEnv.rollout` as train.py calls it: single turn with max_turns=0 (plain sampling), multi-turn with
max_turns > 0 (pauses, one execute_many per step with paused rows, observations written into the KV cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlr1.checkpoint import load_model  # noqa: E402
from sqlr1.data import SHORT_PROMPT, build_prompt, load_dataset  # noqa: E402
from sqlr1.sampling import SamplingParams  # noqa: E402
from sqlr1.sandbox import Sandbox  # noqa: E402
from sqlr1.sql_env import SqlEnv  # noqa: E402
from sqlr1.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data_root", default="toyworld")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=192)
    ap.add_argument("--max_turns", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32)
    lookups = [ex for ex in load_dataset("spider", args.data_root, "train_tools") if "starts with" in ex.question
               or "beginning with" in ex.question][: args.prompts]
    prompts = [build_prompt(ex, tok, SHORT_PROMPT, 512).ids for ex in lookups]
    dbs = [str(ex.db_path) for ex in lookups]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, stop_ids=tok.eos_ids,
                            vocab_size=tok.vocab_size, seed=0)
    times, stats = {0: [], args.max_turns: []}, {}
    with Sandbox(num_workers=2) as sandbox:
        envs = {turns: SqlEnv(sandbox, tok, max_turns=turns, row_limit=3, max_obs_tokens=48, timeout=sandbox.timeout)
                for turns in times}
        envs[args.max_turns].rollout(model, prompts[:1], dbs[:1], 2, params)  # warm-up
        for _ in range(args.repeats):
            for turns, env in envs.items():
                t0 = time.perf_counter()
                episodes = env.rollout(model, prompts, dbs, args.group, params)
                times[turns].append(time.perf_counter() - t0)
                samples, n = episodes.samples, len(episodes.samples.tokens)
                stats[turns] = {"tokens_per_completion": sum(map(len, samples.tokens)) / n,
                                "obs_tokens_per_completion": sum(m.count(False) for m in samples.model_mask) / n}
                if episodes.multi_turn:
                    s = episodes.stats()
                    stats[turns].update(queries_per_completion=s["queries"] / n, query_rate=s["querying_rows"] / n,
                                        query_errors=s["query_errors"])
    single, multi = statistics.median(times[0]), statistics.median(times[args.max_turns])
    print(f"rollout batch of {args.prompts} x {args.group}, max_new_tokens {args.max_new_tokens}, CPU threads "
          f"{torch.get_num_threads()}")
    print(f"single turn: {single:.2f} s   {json.dumps(stats[0])}")
    print(f"multi-turn (max_turns={args.max_turns}): {multi:.2f} s   {json.dumps(stats[args.max_turns])}")
    print(f"ratio multi / single: {multi / single:.2f}")


if __name__ == "__main__":
    main()
