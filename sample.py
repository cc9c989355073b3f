"""Answer questions with a trained model: one question, or a whole Spider / BIRD split scored by execution accuracy.

    python sample.py --model runs/grpo_tiny/final --db toyworld/database/<db_id>/<db_id>.sqlite --question "How many ...?"
    python sample.py --model DIR --dataset spider --data_root data/spider --split dev --n 8 [--limit 100]

Self-consistency (SQL-R1, Sec. 3.3): N candidates at temperature T are executed, grouped by result set, and the
first SQL of the largest group is the answer; --n 1 or --temperature 0 decodes greedily. --max_turns N lets each
candidate run up to N queries inside its reasoning (multi-turn rollouts, sqlr1/sql_env.py); one question then
prints each turn (query, observation) before the answer. Options are spelled as train.py's: --max_new_tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sqlr1.checkpoint import check_vocab, load_model, read_json
from sqlr1.config import DTYPES
from sqlr1.data import PROMPT_TEMPLATES, Example, Prompt, build_prompt, load_dataset, table_names
from sqlr1.distributed import resolve_device
from sqlr1.evaluate import score_pairs
from sqlr1.inference import answer, answer_in_batches
from sqlr1.sampling import NonFiniteLogitsError, SamplingParams
from sqlr1.sandbox import Sandbox
from sqlr1.sql_env import SqlEnv
from sqlr1.tokenizer import load_tokenizer

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (HF layout) or hub repo id")
    one = ap.add_argument_group("one question")
    one.add_argument("--db", help="path to the SQLite database")
    one.add_argument("--question")
    one.add_argument("--evidence", default="", help="external knowledge (BIRD's evidence)")
    many = ap.add_argument_group("a data set")
    many.add_argument("--dataset", choices=["spider", "bird"])
    many.add_argument("--data_root")
    many.add_argument("--split", default="dev")
    many.add_argument("--limit", type=int, default=0, help="only the first K questions")
    many.add_argument("--batch_size", type=int, default=16, help="questions per sampler call")
    many.add_argument("--out", default="", help="directory for predictions and verdicts (default: next to --model)")
    ap.add_argument("--n", type=int, default=8, help="candidates per question (1: greedy)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max_new_tokens", type=int, default=2048)
    ap.add_argument("--template", choices=sorted(PROMPT_TEMPLATES), default=None,
                    help="prompt template (default: the one the checkpoint was trained with, else sqlr1)")
    ap.add_argument("--sample_values", type=int, default=None, help="example values per column in the schema")
    ap.add_argument("--max_prompt_len", type=int, default=4096)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per SQL execution")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", choices=["auto", "true", "false"], default="auto",
                    help="torch.compile the decode step (auto: on CUDA)")
    ap.add_argument("--max_turns", type=int, default=0, help="queries a candidate may run inside <think> (0: single turn)")
    ap.add_argument("--obs_rows", type=int, default=5, help="rows an observation shows (multi-turn)")
    ap.add_argument("--obs_max_tokens", type=int, default=128, help="tokens per observation (multi-turn)")
    args = ap.parse_args(argv)
    if Path(args.model).is_file():
        ap.error(f"--model {args.model}: is a file; give the checkpoint directory (config.json, *.safetensors, "
                 "tokenizer files) or a hub repo id")
    if (args.dataset is None) == (args.question is None):
        ap.error("give either --db and --question (one question) or --dataset and --data_root (a data set)")
    if args.question is not None:
        if not args.question.strip():
            ap.error("--question is empty")
        if not args.db:
            ap.error("--question needs --db path/to/database.sqlite")
        if not Path(args.db).is_file():
            ap.error(f"--db {args.db}: no such database file")
    if args.dataset and not args.data_root:
        ap.error("--dataset needs --data_root (the directory holding the data set's json files and databases)")
    if args.batch_size < 1 or args.limit < 0 or args.n < 1 or args.max_new_tokens < 1 or args.max_prompt_len < 1:
        ap.error("--batch_size, --n, --max_new_tokens and --max_prompt_len must be >= 1, --limit >= 0")
    if args.max_turns < 0 or args.obs_rows < 1 or args.obs_max_tokens < 8:
        ap.error("--max_turns must be >= 0, --obs_rows >= 1, --obs_max_tokens >= 8")
    if not (0 <= args.temperature < math.inf and 0 < args.timeout < math.inf):  # NaN fails too
        ap.error("--temperature must be finite and >= 0, --timeout finite and > 0")
    return args


@dataclass
class PromptSettings:
    template: str
    sample_values: int


def prompt_settings(model_dir: Path, args) -> PromptSettings:
    """The prompt the checkpoint was trained with (train.py records it in sqlr1_prompt.json), unless overridden."""
    saved = {"template": "sqlr1", "sample_values": 0}
    record = model_dir / "sqlr1_prompt.json"
    if record.is_file():
        saved.update(read_json(record))  # a broken file is named
    if saved["template"] not in PROMPT_TEMPLATES or not isinstance(saved["sample_values"], int):
        raise ValueError(f"{record}: template must be one of {sorted(PROMPT_TEMPLATES)} and sample_values an integer "
                         f"(found {saved}); fix the file or delete it and pass --template")
    return PromptSettings(args.template or saved["template"], saved["sample_values"] if args.sample_values is None
                          else args.sample_values)


def check_prompts(prompts: list[Prompt], examples: list[Example], args, budget: int, max_positions: int) -> None:
    """Refuse to answer blind: a prompt over the token budget even without its schema (the question is too long), or
    one that kept not one table of its schema. The limit that decides is named: --max_prompt_len, or the model's
    positions when they are fewer."""
    bad = [i for i, (p, ex) in enumerate(zip(prompts, examples))
           if len(p.ids) > budget or len(p.dropped_tables) == len(table_names(ex.db_path))]
    if not bad:
        return
    first = prompts[bad[0]]
    which = "the question" if args.question is not None else f"{len(bad)} of {len(prompts)} questions (#{bad[0]} first)"
    limit = (f"--max_prompt_len {args.max_prompt_len}" if args.max_prompt_len <= max_positions else
             f"the model's {max_positions} positions (max_position_embeddings)")
    raise_it = "; or raise --max_prompt_len" if args.max_prompt_len <= max_positions else ""
    if len(first.ids) > budget:
        raise ValueError(f"{which}: the prompt is {len(first.ids)} tokens even without the schema, "
                         f"{len(first.ids) - budget} over {limit}: shorten the question{raise_it}")
    raise ValueError(f"{which}: not one table of the schema fits within {limit} (the prompt without it is "
                     f"{len(first.ids)} tokens){raise_it.replace('; or', ';')}")


def check_generation_length(args, max_positions: int) -> None:
    if args.max_new_tokens > max_positions:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens}: the model has {max_positions} positions "
                         "(max_position_embeddings), prompt included; ask for fewer tokens")


def print_table(rows: list[tuple], ncols: int, limit: int = 10) -> None:
    shown = [[str(v) for v in row] for row in rows[:limit]]
    widths = [max([len(r[c]) for r in shown] + [1]) for c in range(ncols)]
    for r in shown:
        print("  " + " | ".join(v.ljust(w)[:60] for v, w in zip(r, widths)))
    if len(rows) > limit:
        print(f"  ... {len(rows) - limit} more rows")


def one_question(model, env: SqlEnv, settings: PromptSettings, args) -> None:
    ex = Example(question=args.question, db_id=Path(args.db).stem, db_path=Path(args.db), sql="", evidence=args.evidence)
    budget = min(args.max_prompt_len, model.config.max_position_embeddings)
    prompt = build_prompt(ex, env.tokenizer, PROMPT_TEMPLATES[settings.template], budget, settings.sample_values)
    check_prompts([prompt], [ex], args, budget, model.config.max_position_embeddings)
    a = answer(env, model, [prompt.ids], [str(ex.db_path)], args.n, sampling_params(args, env), progress=None)[0]
    for k, turn in enumerate(a.turns, 1):
        print(f"=== turn {k}: query ({turn.status}) ===\n{turn.sql}\n=== turn {k}: observation ===\n"
              f"{turn.observation.strip()}\n")
    print("=== reasoning and answer ===" + (" (the model's own text; observations above)" if a.turns else ""))
    print("<think>\n" + a.response.strip())
    print(f"\n=== SQL ({a.votes} of {len(a.candidates)} candidates agree; {a.num_valid} executed) ===")
    if not a.sql:
        print("no candidate produced a SQL query")
        return
    print(a.sql)
    if a.result is None or not a.result.ok:
        print(f"\nevery candidate failed to execute; kept for the record. Error: {a.result.error if a.result else ''}")
        return
    print(f"\n=== result: {len(a.result.rows)} rows{' (truncated)' if a.result.truncated else ''} ===")
    print_table(a.result.rows, a.result.ncols)


def sampling_params(args, env: SqlEnv) -> SamplingParams:
    """The sampling settings of the command line (compile auto: on CUDA)."""
    compile = args.compile == "true" or (args.compile == "auto" and resolve_device(args.device).type == "cuda")
    return SamplingParams(args.max_new_tokens, args.temperature, stop_ids=env.tokenizer.eos_ids,
                          vocab_size=env.tokenizer.vocab_size, seed=args.seed, compile=compile)


def dataset_eval(model, env: SqlEnv, settings: PromptSettings, args, model_dir: Path) -> None:
    examples = load_dataset(args.dataset, args.data_root, args.split)
    if args.limit:
        examples = examples[: args.limit]
    budget = min(args.max_prompt_len, model.config.max_position_embeddings)
    template = PROMPT_TEMPLATES[settings.template]
    built = [build_prompt(ex, env.tokenizer, template, budget, settings.sample_values) for ex in examples]
    check_prompts(built, examples, args, budget, model.config.max_position_embeddings)
    prompts = [p.ids for p in built]
    dbs = [str(ex.db_path) for ex in examples]
    runs = {"greedy": 1} if args.n == 1 or args.temperature == 0 else {"greedy": 1, f"voted@{args.n}": args.n}
    out = Path(args.out) if args.out else model_dir / f"eval_{args.dataset}_{args.split}"
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    mode = "bird" if args.dataset == "bird" else "spider"
    for name, n in runs.items():
        t0 = time.time()
        preds = [a.sql for a in answer_in_batches(env, model, prompts, dbs, n, sampling_params(args, env), mode,
                                                  args.batch_size, desc=name)]
        elapsed = time.time() - t0
        write_predictions(out, name, args.dataset, examples, preds)
        verdicts = score_pairs(env.sandbox, preds, [ex.sql for ex in examples], dbs, mode=mode, timeout=args.timeout)
        with (out / f"verdicts_{name}.jsonl").open("w") as f:
            for i, (ex, v) in enumerate(zip(examples, verdicts)):
                f.write(json.dumps({"index": i, "db_id": ex.db_id, "match": v.match, "pred_status": v.pred.status,
                                    "gold_status": v.gold.status, "difficulty": ex.difficulty}) + "\n")
        ex_all = sum(v.match for v in verdicts) / max(1, len(verdicts))
        by_level = {}
        for ex, v in zip(examples, verdicts):
            if ex.difficulty:
                by_level.setdefault(ex.difficulty, []).append(v.match)
        summary[name] = {"EX": ex_all, **{k: sum(m) / len(m) for k, m in sorted(by_level.items())}}
        gold_errors = sum(v.gold_error for v in verdicts)
        print(f"{name}: EX {ex_all:.3f} on {len(examples)} questions ({len(examples) / elapsed:.2f} questions/s)"
              + (f"; {gold_errors} gold queries failed (counted as misses)" if gold_errors else ""))
    cols = sorted({k for s in summary.values() for k in s}, key=lambda k: (k != "EX", k))
    print("\n" + f"{'':<10}" + "".join(f"{c:>10}" for c in cols))
    for name, s in summary.items():
        print(f"{name:<10}" + "".join(f"{s.get(c, float('nan')):>10.3f}" for c in cols))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"predictions and verdicts: {out}")


def write_predictions(out: Path, name: str, dataset: str, examples: list[Example], preds: list[str]) -> None:
    """Official formats: Spider one SQL per line (+ gold `SQL\\tdb_id`); BIRD {index: 'SQL\\t----- bird -----\\tdb_id'}."""
    flat = [" ".join(p.split()) or "SELECT 1" for p in preds]  # one line each; never an empty line
    if dataset == "bird":
        record = {str(i): f"{p}\t----- bird -----\t{ex.db_id}" for i, (p, ex) in enumerate(zip(flat, examples))}
        (out / f"predict_{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    else:
        (out / f"pred_{name}.txt").write_text("".join(p + "\n" for p in flat))
        (out / "gold.txt").write_text("".join(f"{' '.join(ex.sql.split())}\t{ex.db_id}\n" for ex in examples))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=dtype, device=device)
    check_vocab(tokenizer.vocab_size, model, args.model)
    check_generation_length(args, model.config.max_position_embeddings)
    model_dir = Path(args.model) if Path(args.model).is_dir() else Path(".")
    settings = prompt_settings(model_dir, args)
    with Sandbox(timeout=args.timeout) as sandbox:
        env = SqlEnv(sandbox, tokenizer, args.max_turns, args.obs_rows, args.obs_max_tokens, args.timeout)
        try:
            if args.question is not None:
                one_question(model, env, settings, args)
            else:
                dataset_eval(model, env, settings, args, model_dir)
        except NonFiniteLogitsError as e:
            raise ValueError(f"checkpoint {args.model} is broken: {e}") from None
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
