"""Held-out greedy EX of trained toy models split by question family (configs/lab_tools.py's models): the lookup
questions of `dev_tools` (the records after dev.json's) and the rest, with the share of each answered after a query.

    python benchmarks/lookup_family.py multi0=runs/lab_tools/multi_turn/seed0/final:3 \\
        single0=runs/lab_tools/single_turn/seed0/final:0 ...          # LABEL=MODEL_DIR:MAX_TURNS, one JSON line each

Prompts, decoding and observations as configs/grpo_tiny_tools.py evaluates (read from it, not repeated here).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlr1.checkpoint import load_model  # noqa: E402
from sqlr1.config import load_config  # noqa: E402
from sqlr1.data import SHORT_PROMPT, build_prompt, load_dataset  # noqa: E402
from sqlr1.evaluate import score_pairs  # noqa: E402
from sqlr1.inference import answer_in_batches  # noqa: E402
from sqlr1.sampling import SamplingParams  # noqa: E402
from sqlr1.sandbox import Sandbox  # noqa: E402
from sqlr1.sql_env import SqlEnv  # noqa: E402
from sqlr1.tokenizer import load_tokenizer  # noqa: E402


def share(flags: list[bool], idx: range) -> float:
    return sum(flags[i] for i in idx) / max(len(idx), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="LABEL=MODEL_DIR:MAX_TURNS")
    ap.add_argument("--world", default="toyworld")
    args = ap.parse_args()
    cfg = load_config("configs/grpo_tiny_tools.py")
    exs = load_dataset("spider", args.world, "dev_tools")
    n_plain = len(json.loads(Path(args.world, "dev.json").read_text()))
    lookup, other = range(n_plain, len(exs)), range(n_plain)
    dbs, golds = [str(e.db_path) for e in exs], [e.sql for e in exs]
    with Sandbox(num_workers=2, timeout=cfg.reward.timeout) as sandbox:
        for spec in args.models:
            label, rest = spec.split("=", 1)
            model_dir, turns = rest.rsplit(":", 1)
            tok = load_tokenizer(model_dir)
            model = load_model(model_dir, dtype=torch.float32, device="cpu")
            ids = [build_prompt(e, tok, SHORT_PROMPT, cfg.max_prompt_len, cfg.sample_values).ids for e in exs]
            env = SqlEnv(sandbox, tok, max_turns=int(turns), row_limit=cfg.obs_rows, max_obs_tokens=cfg.obs_max_tokens,
                         timeout=cfg.reward.timeout)
            greedy = SamplingParams(max_new_tokens=cfg.max_response_len, temperature=0.0, seed=0)
            answers = answer_in_batches(env, model, ids, dbs, 1, greedy, batch_size=cfg.eval_batch_size)
            ok = [v.match for v in score_pairs(sandbox, [a.sql for a in answers], golds, dbs, mode=cfg.reward.mode,
                                               timeout=cfg.reward.timeout)]
            queried = [bool(a.turns) for a in answers]
            print(json.dumps({"label": label, "lookup_ex": share(ok, lookup), "other_ex": share(ok, other),
                              "lookup_query": share(queried, lookup), "other_query": share(queried, other)}), flush=True)


if __name__ == "__main__":
    main()
