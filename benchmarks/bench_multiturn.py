"""Cost of multi-turn rollouts: one GRPO rollout batch of the toy world, single turn vs multi-turn, same model.

    python benchmarks/bench_multiturn.py --model runs/<run>/final [--data_root toyworld] [--prompts 8 --group 8]

Both sides sample the same prompts (lookup questions of train_tools, where a tools-trained model queries) with the
same seed, temperature 1 and max_new_tokens, in the same process, alternating, `--repeats` times each; it prints the
median time per rollout batch, the ratio, tokens per completion and how the multi-turn side used the database.
Single turn: `sampling.generate` as train.py calls it with max_turns=0; multi-turn: `inference.generate_episodes`
(pauses, one execute_many per step with paused rows, observations written into the KV cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sqlr1.checkpoint import load_model
from sqlr1.data import SHORT_PROMPT, build_prompt, load_dataset
from sqlr1.inference import generate_episodes
from sqlr1.sandbox import Sandbox
from sqlr1.tokenizer import load_tokenizer


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
    common = dict(max_new_tokens=args.max_new_tokens, temperature=1.0, stop_ids=tok.eos_ids, vocab_size=tok.vocab_size,
                  seed=0, progress=False)
    times, stats = {0: [], args.max_turns: []}, {}
    with Sandbox(num_workers=2) as sandbox:
        generate_episodes(model, tok, prompts[:1], dbs[:1], sandbox, 2, args.max_turns, 3, 48, **common)  # warm-up
        for _ in range(args.repeats):
            for turns in times:
                t0 = time.perf_counter()
                samples, env = generate_episodes(model, tok, prompts, dbs, sandbox, args.group, turns, 3, 48, **common)
                times[turns].append(time.perf_counter() - t0)
                n = len(samples.tokens)
                stats[turns] = {"tokens_per_completion": sum(map(len, samples.tokens)) / n,
                         "obs_tokens_per_completion": sum(m.count(False) for m in samples.model_mask) / n}
                if env:
                    s = env.stats()
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
