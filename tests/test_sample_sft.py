"""Cold-start SFT (loss only on response tokens, and it goes down) and sample.py end to end on a tiny checkpoint."""

import contextlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqlr1.batch import TrainSequence, collate
from sqlr1.checkpoint import load_model, save_model
from sqlr1.config import TrainConfig
from sqlr1.data import Example, SHORT_PROMPT, build_prompt, sft_response
from sqlr1.distributed import Dist, Models
from sqlr1.grpo import loss_norm, sft_loss
from sqlr1.sampling import SamplingParams
from sqlr1.sql_env import SqlEnv
from sqlr1.tokenizer import load_tokenizer
from sqlr1.toyworld import build_toyworld, init_model
from sqlr1.update import new_optimizer, sft_update

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small toy world and a freshly initialised tiny checkpoint in HF layout."""
    base = tmp_path_factory.mktemp("tiny")
    world = build_toyworld(base / "world", seed=0, num_train_dbs=3, num_dev_dbs=1)
    model_dir = init_model(base / "model", world / "tokenizer", seed=0)
    return world, model_dir


def sft_batch(world, tok, n: int):
    records = json.loads((world / "train.json").read_text())[:n]
    seqs = []
    for r in records:
        ex = Example(r["question"], r["db_id"], world / "database" / r["db_id"] / f"{r['db_id']}.sqlite", r["query"],
                     reasoning=r["cot"])
        prompt = build_prompt(ex, tok, SHORT_PROMPT, 512).ids
        seqs.append(TrainSequence(prompt, tok.encode(sft_response(ex)) + [tok.eos_ids[0]]))
    return seqs


def test_sft_masks_the_prompt_and_drives_the_response_loss_down(tiny):
    world, model_dir = tiny
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32).train()
    seqs = sft_batch(world, tok, 8)
    mb = collate(seqs, tok.pad_id)
    # the loss mask covers exactly the response tokens (stop token included), never a prompt position
    assert mb.mask.sum().item() == sum(len(s.completion) for s in seqs)
    for i, s in enumerate(seqs):
        row = mb.input_ids[i, mb.start + 1 :][mb.mask[i].bool()].tolist()
        assert row == s.completion
    cfg = TrainConfig(max_response_len=128, grad_clip=1.0, sft_lr=3e-3, sft_steps=30, micro_batch_size=8)
    optimizer = new_optimizer(model, cfg, "sft")
    models = Models(model, None, model, contextlib.nullcontext())
    losses = [sft_update(models, optimizer, seqs, tok, cfg, Dist())["loss"] for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_sft_loss_comes_only_from_masked_response_tokens(tiny):
    """With the completion mask zeroed nothing contributes: prompt and padding positions never carry SFT loss."""
    world, model_dir = tiny
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    seqs = sft_batch(world, tok, 2)
    mb = collate(seqs, tok.pad_id)
    norm = loss_norm([mb.mask], 128)
    with torch.no_grad():
        lp, _ = model.token_logprobs(mb.input_ids, mb.attention_mask, start=mb.start, vocab_size=tok.vocab_size)
    assert sft_loss(lp, mb.mask, norm).item() > 0
    mb.mask.zero_()
    assert sft_loss(lp, mb.mask, norm).item() == 0.0


def run_sample(*args):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_sample_py_answers_one_question_end_to_end(tiny):
    world, model_dir = tiny
    record = json.loads((world / "dev.json").read_text())[0]
    db = world / "database" / record["db_id"] / f"{record['db_id']}.sqlite"
    proc = run_sample("--model", str(model_dir), "--db", str(db), "--question", record["question"], "--n", "4",
                      "--max_new_tokens", "24", "--template", "short")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "=== reasoning and answer ===" in proc.stdout and "candidates" in proc.stdout


def test_sample_py_scores_a_dataset(tiny, tmp_path):
    world, model_dir = tiny
    proc = run_sample("--model", str(model_dir), "--dataset", "spider", "--data_root", str(world), "--split", "dev",
                      "--limit", "6", "--n", "2", "--max_new_tokens", "16", "--template", "short", "--out",
                      str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "greedy: EX" in proc.stdout and "voted@2: EX" in proc.stdout
    assert len((tmp_path / "pred_greedy.txt").read_text().splitlines()) == 6
    verdicts = [json.loads(line) for line in (tmp_path / "verdicts_voted@2.jsonl").read_text().splitlines()]
    assert len(verdicts) == 6 and all(v["gold_status"] == "ok" for v in verdicts)


def test_sample_py_bad_input_is_one_line(tiny, tmp_path):
    _, model_dir = tiny
    proc = run_sample("--model", str(model_dir), "--db", str(tmp_path / "nope.sqlite"), "--question", "How many?")
    assert proc.returncode != 0 and "no such database file" in proc.stderr and "Traceback" not in proc.stderr
    db = tmp_path / "x.sqlite"
    sqlite3.connect(db).close()
    proc = run_sample("--model", str(model_dir), "--db", str(db), "--question", "   ")
    assert proc.returncode != 0 and "--question is empty" in proc.stderr
    no_weights = tmp_path / "no_weights"  # tokenizer and config present, weights missing
    no_weights.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (no_weights / name).write_bytes((model_dir / name).read_bytes())
    proc = run_sample("--model", str(no_weights), "--db", str(db), "--question", "How many?")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "safetensors" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("case, flags, named", [
    ("model is a file", [], "is a file"),  # was a NotADirectoryError traceback
    ("", ["--max_new_tokens", "100000"], "2048 positions"),  # ran on past the model's positions
    ("", ["--max_prompt_len", "5"], "--max_prompt_len 5"),  # answered with no schema, exit 0
    ("100 KB question", [], "even without the schema"),  # was "dropped 2 tables" then "truncate the prompt"
    ("undecodable question", [], "not valid Unicode"),  # a byte that is not UTF-8 in argv: was a TypeError
])
def test_sample_py_refuses_limits_that_cannot_work(tiny, case, flags, named):
    world, model_dir = tiny
    record = json.loads((world / "dev.json").read_text())[0]
    db = world / "database" / record["db_id"] / f"{record['db_id']}.sqlite"
    model = model_dir / "config.json" if case == "model is a file" else model_dir
    question = {"100 KB question": "How many clubs are there? " * 4000,
                "undecodable question": "How many caf\udcff clubs?"}.get(case, record["question"])
    proc = run_sample("--model", str(model), *flags, "--db", str(db), "--question", question, "--n", "1",
                      "--template", "short")
    assert proc.returncode != 0 and named in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "=== SQL" not in proc.stdout


def test_sample_py_says_a_nan_checkpoint_is_broken(tiny, tmp_path):
    world, model_dir = tiny
    model = load_model(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    broken = save_model(model, tmp_path / "nan", tokenizer=load_tokenizer(model_dir))
    record = json.loads((world / "dev.json").read_text())[0]
    db = world / "database" / record["db_id"] / f"{record['db_id']}.sqlite"
    for n in ("1", "4"):  # greedy printed "!!!!!!!!" (argmax of NaNs), sampling failed deep inside with an index error
        proc = run_sample("--model", str(broken), "--db", str(db), "--question", record["question"], "--n", n,
                          "--max_new_tokens", "8", "--template", "short")
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert f"checkpoint {broken} is broken" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1


def test_held_out_evaluation_on_a_rank_without_examples(tiny):
    """More ranks than eval examples: a rank with none must still join the sums (else the others wait forever)."""
    from sqlr1.inference import evaluate_policy
    from sqlr1.sandbox import Sandbox

    world, model_dir = tiny
    model, tok = load_model(model_dir, dtype=torch.float32), load_tokenizer(world / "tokenizer")
    with Sandbox(num_workers=1) as sandbox:
        scores = evaluate_policy(SqlEnv(sandbox, tok), model, [], [], TrainConfig(), Dist())
    assert scores == {"ex_greedy": 0.0, "ex_voted": 0.0, "format_ok": 0.0, "mean_reward": 0.0}


def test_held_out_evaluation_runs_in_bounded_batches_with_the_same_answers(tiny, monkeypatch):
    """evaluate_policy sends at most eval_batch_size prompts (x eval_n rows) to one generate call; greedy answers are
    those of one unbatched call, and each voted batch starting at prompt s is seeded with seed + s."""
    from sqlr1 import inference
    from sqlr1.data import load_dataset
    from sqlr1.inference import answer, answer_in_batches, evaluate_policy
    from sqlr1.sandbox import Sandbox

    world, model_dir = tiny
    model, tok = load_model(model_dir, dtype=torch.float32), load_tokenizer(world / "tokenizer")
    model.init_weights(std=0.5, generator=torch.Generator().manual_seed(0))  # peaked, prompt-dependent completions
    examples = load_dataset("spider", world, "dev")[:5]  # the toy world is laid out like Spider
    prompts = [build_prompt(ex, tok, SHORT_PROMPT, 512) for ex in examples]
    ids, dbs = [p.ids for p in prompts], [str(ex.db_path) for ex in examples]
    rows_per_call = []
    real_generate = inference.SqlEnv.rollout

    def counting_rollout(env, model, prompts, db_paths, num_samples, params, progress=False):  # the real one, counted
        rows_per_call.append(len(prompts) * num_samples)
        return real_generate(env, model, prompts, db_paths, num_samples, params, progress)

    monkeypatch.setattr(inference.SqlEnv, "rollout", counting_rollout)
    cfg = TrainConfig(eval_batch_size=2, eval_n=3, max_response_len=10, seed=3)
    with Sandbox(num_workers=1) as sandbox:
        env = SqlEnv(sandbox, tok)
        batched = evaluate_policy(env, model, examples, prompts, cfg, Dist())
        assert rows_per_call == [2, 2, 1, 6, 6, 3]  # greedy pass, then the voted pass: <= 2 prompts x 3 rows
        rows_per_call.clear()
        unbatched = evaluate_policy(env, model, examples, prompts, TrainConfig(
            eval_batch_size=0, eval_n=3, max_response_len=10, seed=3), Dist())
        assert rows_per_call == [5, 15]
        for key in ("ex_greedy", "format_ok", "mean_reward"):  # the greedy numbers do not depend on the batching
            assert batched[key] == unbatched[key]

        greedy = SamplingParams(max_new_tokens=10, temperature=0.0, seed=3)
        one_call = answer_in_batches(env, model, ids, dbs, 1, greedy, batch_size=0)
        in_pairs = answer_in_batches(env, model, ids, dbs, 1, greedy, batch_size=2)
        assert in_pairs == one_call and len({a.response for a in one_call}) > 1
        sampled = SamplingParams(max_new_tokens=10, temperature=0.8, seed=3)
        voted = answer_in_batches(env, model, ids, dbs, 3, sampled, batch_size=2)
        assert voted == answer_in_batches(env, model, ids, dbs, 3, sampled, batch_size=2)
        for s in (0, 2, 4):
            assert voted[s : s + 2] == answer(env, model, ids[s : s + 2], dbs[s : s + 2], 3,
                                              SamplingParams(max_new_tokens=10, temperature=0.8, seed=3 + s))
    with pytest.raises(ValueError, match="batch_size=-1"):
        answer_in_batches(None, model, ids, dbs, 1, greedy, batch_size=-1)
