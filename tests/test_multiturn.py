"""Multi-turn rollouts: the sampler's pause hook (generic, no SQL), the SQL environment, and their training masks."""

import pytest
import torch

from sqlr1.sampling import SamplingParams, generate
from tests.test_sampling import PROMPTS, VOCAB, tiny_model

PAUSE = tuple(range(0, VOCAB, 3))  # a third of the ids pause: random tiny models hit them often


def observation(generated: list[int]) -> list[int]:
    """A deterministic 'environment': 0-3 tokens that depend on the row's completion so far only."""
    n = (sum(generated) + len(generated)) % 4
    return [(7 * sum(generated) + 5 * i) % VOCAB for i in range(n)]


class Hook:
    """A pause hook (sampling.PauseHook) answering with `answer(generated)`, recording each call's rows."""

    def __init__(self, answer=None, ids=PAUSE):
        self.ids, self.answer, self.calls = ids, answer or observation, []

    def __call__(self, rows, generated):
        self.calls.append(list(rows))
        return [self.answer(g) for g in generated]


def gen(model, prompts, num_samples=1, pause=None, share_prefix=True, **params):
    return generate(model, prompts, num_samples, SamplingParams(**params), pause=pause, share_prefix=share_prefix)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def reference(model, prompt: list[int], n: int, stop: int | None = None) -> tuple[list[int], list[bool]]:
    """Uncached greedy, one row, turn by turn: full forward each step, the observation appended after a pause id."""
    out, flags = [], []
    with torch.no_grad():
        while len(out) < n:
            y = int(model(torch.tensor([prompt + out]))[0, -1, :VOCAB].argmax())
            out.append(y)
            flags.append(True)
            if y == stop:
                break
            if y in PAUSE and len(out) < n:
                obs = observation(out)[: n - len(out)]
                out += obs
                flags += [False] * len(obs)
    return out, flags


def run(model, prompts, **kw):
    return gen(model, prompts, pause=Hook(), **{**dict(max_new_tokens=24, temperature=0, vocab_size=VOCAB), **kw})


def test_greedy_batch_equals_each_row_alone_turn_by_turn(model):
    out = run(model, PROMPTS, check_every=2, stop_ids=[11])
    assert any(not f for m in out.model_mask for f in m), "no observation was appended: the test tests nothing"
    for i, prompt in enumerate(PROMPTS):
        ref_tokens, ref_flags = reference(model, prompt, 24, stop=11)
        assert out.tokens[i] == ref_tokens
        assert out.model_mask[i] == ref_flags
        alone = run(model, [prompt], stop_ids=[11])
        assert alone.tokens[0] == ref_tokens and alone.model_mask[0] == ref_flags


@pytest.mark.parametrize("temperature", [1.0])
def test_seeded_prefix_shared_equals_unshared(model, temperature):
    kw = dict(num_samples=3, temperature=temperature, seed=5, stop_ids=[11])
    a = run(model, PROMPTS, share_prefix=True, **kw)
    b = run(model, PROMPTS, share_prefix=False, **kw)
    c = run(model, PROMPTS, share_prefix=True, check_every=1, **kw)  # compaction every step
    assert a.tokens == b.tokens == c.tokens and a.model_mask == b.model_mask
    assert torch.allclose(torch.tensor(sum(a.logprobs, [])), torch.tensor(sum(b.logprobs, [])), atol=1e-5)


def test_logprobs_of_model_tokens_equal_teacher_forced_forward(model):
    out = run(model, PROMPTS, num_samples=2, temperature=1.0, seed=3)
    assert any(not f for m in out.model_mask for f in m)
    for j, (tokens, lp, flags) in enumerate(zip(out.tokens, out.logprobs, out.model_mask)):
        prompt = PROMPTS[out.prompt_index[j]]
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            ref = model.token_logprobs(ids, torch.ones_like(ids), start=len(prompt) - 1, vocab_size=VOCAB)[0][0]
        model_pos = torch.tensor(flags)
        assert torch.allclose(torch.tensor(lp)[model_pos], ref[model_pos], atol=1e-4)
        assert all(x == 0.0 for x, f in zip(lp, flags) if not f)  # appended tokens carry no sampler log-prob


def test_budget_counts_observations_and_one_call_per_step(model):
    hook = Hook()
    out = gen(model, PROMPTS, 2, hook, max_new_tokens=10, temperature=1.0, seed=1, vocab_size=VOCAB)
    calls = hook.calls
    assert all(len(t) == 10 for t in out.tokens) and out.finish_reason == ["length"] * 8
    assert any(len(c) > 1 for c in calls)  # rows pausing at the same step share one call
    assert all(len(set(c)) == len(c) for c in calls)


def test_long_observation_grows_the_cache_and_is_clipped_to_the_budget(model):
    flood = Hook(lambda generated: [1 + i % 50 for i in range(40)])  # wider than L + max_new_tokens
    out = gen(model, PROMPTS, pause=flood, max_new_tokens=30, temperature=0, vocab_size=VOCAB)
    for tokens, flags in zip(out.tokens, out.model_mask):
        assert len(tokens) == 30
        first = flags.index(False) if False in flags else None
        if first is not None:
            assert tokens[first : 30] == [1 + i % 50 for i in range(30 - first)]


def test_single_turn_has_all_model_tokens(model):
    out = gen(model, PROMPTS, max_new_tokens=6, temperature=0, vocab_size=VOCAB)
    assert out.model_mask == [[True] * 6] * 4


# ------------------------------------------------------------------------------------------- the SQL environment

import hashlib  # noqa: E402
import os  # noqa: E402
import sqlite3  # noqa: E402

from sqlr1.reward import parse_response  # noqa: E402
from sqlr1.sandbox import Sandbox  # noqa: E402
from sqlr1.sql_env import EpisodeState, SqlEnv, model_text, pause_ids  # noqa: E402
from sqlr1.tokenizer import load_tokenizer  # noqa: E402
from sqlr1.toyworld import train_tokenizer, vocabulary_words, write_tokenizer  # noqa: E402
from tests.test_sandbox import HOSTILE  # noqa: E402
from tests.test_tokenizer import write_tokenizer as write_qwen_like  # noqa: E402

def episodes(pool, tok, db_paths, max_turns=5, **kw) -> EpisodeState:
    """A multi-turn rollout batch's state (the sampler's pause hook) over `db_paths`, one per row."""
    return EpisodeState(SqlEnv(pool, tok, max_turns, **kw), db_paths)


TEN_MILLION = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 10000000) SELECT x FROM c"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    texts = ["<think> look it up <sql>SELECT name FROM t WHERE id = 3</sql>\n</think>\n<answer>```sql\nSELECT 1\n```"
             "</answer>"] * 20
    write_tokenizer(train_tokenizer(texts, vocabulary_words(), 600, repeat=2), root / "toy")
    write_qwen_like(root / "qwen")
    return {"toy": load_tokenizer(root / "toy"), "qwen": load_tokenizer(root / "qwen")}


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("envdb") / "t.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"Name{i}") for i in range(50)])
    conn.commit()
    conn.close()
    return path


@pytest.fixture(scope="module")
def pool():
    with Sandbox(num_workers=2, timeout=2.0) as sandbox:
        yield sandbox


@pytest.mark.parametrize("which", ["toy", "qwen"])
@pytest.mark.parametrize("after", ["\n", " then", "x", ""])
def test_the_closing_token_of_sql_pauses_and_is_found_once(tokenizers, pool, db, which, after):
    tok = tokenizers[which]
    ids = tok.encode(f" I check <sql>SELECT name FROM t WHERE id > 2</sql>{after}")
    pauses = set(pause_ids(tok))
    env = episodes(pool, tok, [str(db)])
    found = [n for n in range(1, len(ids) + 1) if ids[n - 1] in pauses and env.query(0, ids[:n]) is not None]
    # exactly one pause reads the query: the token that completes "</sql>"
    assert len(found) == 1 and "</sql>" in tok.decode(ids[: found[0]]) and "</sql>" not in tok.decode(ids[: found[0] - 1])
    env2 = episodes(pool, tok, [str(db)])
    assert env2.query(0, ids[: found[0]]) == "SELECT name FROM t WHERE id > 2"


def observe(env, row, text):
    """The observation the env appends after `text` (as the sampler would call it), decoded."""
    [ids] = env([row], [env.env.tokenizer.encode(text)])
    return env.env.tokenizer.decode(ids)


def test_observations_rows_errors_timeouts_and_huge_results(tokenizers, pool, db):
    tok = tokenizers["qwen"]
    env = episodes(pool, tok, [str(db)] * 4, row_limit=3, timeout=0.5)
    rows = observe(env, 0, "<sql>SELECT id, name FROM t ORDER BY id</sql>")
    assert rows.strip() == "<observation>\nid | name\n0 | Name0\n1 | Name1\n2 | Name2\n(first 3 rows shown)\n</observation>"
    assert "error: no such column: nope" in observe(env, 1, "<sql>SELECT nope FROM t</sql>")
    assert "timeout" in observe(env, 2, "<sql>WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                                        "SELECT count(*) FROM c</sql>")
    huge = observe(env, 3, f"<sql>{TEN_MILLION}</sql>")  # 3 rows fetched, not 10 million
    assert "x\n1\n2\n3\n(first 3 rows shown)" in huge
    assert [t[0].status for t in env.turns] == ["ok", "error", "timeout", "ok"]
    assert [len(t) for t in env.turns] == [1] * 4 and sum(t[0].status in ("error", "timeout") for t in env.turns) == 2


def test_row_limit_in_the_sandbox(pool, db):
    [r] = pool.execute_many([(db, TEN_MILLION)], row_limit=2)
    assert r.ok and r.rows == [(1,), (2,)] and r.truncated and r.columns == ["x"]
    [r] = pool.execute_many([(db, "SELECT id FROM t WHERE id < 2")], row_limit=2)
    assert r.ok and r.rows == [(0,), (1,)] and not r.truncated
    [r] = pool.execute_many([(db, TEN_MILLION)], timeout=5.0)  # without a limit: over the pool's max_rows
    assert r.status == "error" and r.truncated


def test_max_turns_and_the_token_budget(tokenizers, pool, db):
    tok = tokenizers["toy"]
    env = episodes(pool, tok, [str(db)], max_turns=2, max_obs_tokens=60, row_limit=50)
    ids = []
    for _ in range(3):
        ids += tok.encode(" <sql>SELECT name FROM t</sql>")
        obs = env([0], [ids])[0]
        assert len(obs) <= 60
        ids += obs
    assert [t.status for t in env.turns[0]] == ["ok", "ok", "refused"]
    assert "not executed" in env.turns[0][2].observation and " ..." in env.turns[0][0].observation


def test_no_query_after_think_and_none_without_a_close(tokenizers, pool, db):
    tok = tokenizers["toy"]
    env = episodes(pool, tok, [str(db)] * 2)
    assert env([0, 1], [tok.encode(" a <sql>SELECT 1"), tok.encode("x</think> <sql>SELECT 1</sql>")]) == [[], []]
    assert env.turns == [[], []]


@pytest.mark.parametrize("name", ["attach_new_file", "load_extension", "insert", "writable_schema", "vacuum_into",
                                  "journal_mode_wal", "drop_table"])
def test_hostile_sql_in_a_rollout_changes_no_file(tokenizers, pool, db, name):
    folder = db.parent
    before = hashlib.sha256(db.read_bytes()).hexdigest(), sorted(os.listdir(folder))
    env = episodes(pool, tokenizers["qwen"], [str(db)], timeout=1.0)
    out = observe(env, 0, f"<sql>{HOSTILE[name].replace('{folder}', str(folder))}</sql>")
    assert env.turns[0][0].status in ("error", "timeout") and "<observation>" in out
    assert (hashlib.sha256(db.read_bytes()).hexdigest(), sorted(os.listdir(folder))) == before


def test_model_text_drops_observations_and_observation_tags_are_a_format_error(tokenizers):
    tok = tokenizers["qwen"]
    good = " a</think>\n<answer>```sql\nSELECT 1\n```</answer>"
    obs = tok.encode("<observation>\n```sql\nSELECT 2\n```</answer>\n</observation>")
    tokens = tok.encode(" look <sql>SELECT 2</sql>") + obs + tok.encode(good)
    mask = [True] * len(tokens)
    start = len(tok.encode(" look <sql>SELECT 2</sql>"))
    mask[start : start + len(obs)] = [False] * len(obs)
    text = model_text(tok, tokens, mask)
    assert "<observation>" not in text and parse_response(text).format_ok and parse_response(text).sql == "SELECT 1"
    assert not parse_response(" look <observation>rows</observation>" + good).format_ok


# ------------------------------------------------------------------------------------------------------ training

from sqlr1.batch import TrainSequence, collate  # noqa: E402
from sqlr1.grpo import GRPOConfig, LossInputs, loss_norm, policy_loss  # noqa: E402
from sqlr1.update import logprobs  # noqa: E402


def interleaved_sequences(old_obs: float = 0.0) -> list[TrainSequence]:
    """2 prompts x 2 completions of model tokens with observations (loss_mask 0) in between."""
    g = torch.Generator().manual_seed(0)
    seqs = []
    for p in range(2):
        prompt = torch.randint(1, VOCAB, (3 + 2 * p,), generator=g).tolist()
        for j in range(2):
            n = 9 + 2 * j
            mask = [1.0] * n
            mask[2 + j : 6 + j] = [0.0] * 4  # a 4-token observation
            old = [(-1.0 if m else old_obs) for m in mask]
            seqs.append(TrainSequence(prompt, torch.randint(1, VOCAB, (n,), generator=g).tolist(), mask,
                                      advantage=1.0 + j, sampler_logp=old, group=p))
    return seqs


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_observations_get_no_gradient_and_do_not_count_in_the_denominator(model, shared, loss_agg):
    cfg = GRPOConfig(kl_coef=0.0, loss_agg=loss_agg)

    def step(seqs):
        mb = collate(seqs, pad_id=0, shared=shared)
        norm = loss_norm([mb.mask], 16)
        logp, _ = logprobs(model, mb, 1.0, VOCAB)
        loss, _ = policy_loss(LossInputs(logp, mb.sampler_logp, mb.advantages, mb.mask), cfg, norm)
        model.zero_grad()
        d_logp, = torch.autograd.grad(loss, logp, retain_graph=True)
        loss.backward()
        return mb, norm, d_logp, {k: p.grad.clone() for k, p in model.named_parameters()}

    mb, norm, d_logp, grads = step(interleaved_sequences())
    model_tok = torch.zeros_like(mb.mask, dtype=torch.bool)
    for i, s in enumerate(interleaved_sequences()):
        model_tok[i, : len(s.completion)] = torch.tensor(s.loss_mask) > 0
    assert norm.num_tokens == model_tok.sum() == 4 * 10 - 16
    assert (d_logp[~model_tok] == 0).all() and (d_logp[model_tok] != 0).all()
    # what old / sampler values the observation positions carry changes nothing (inf included)
    _, _, d2, grads2 = step(interleaved_sequences(old_obs=float("inf")))
    assert torch.equal(d_logp, d2) and all(torch.equal(grads[k], grads2[k]) for k in grads)


# ----------------------------------------------------------------------------------------------------- toy world

import json  # noqa: E402

from sqlr1.sql_env import encode_with_observations  # noqa: E402
from sqlr1.toyworld import build_toyworld  # noqa: E402


def test_toy_lookup_family_and_its_traces_match_the_environment(tmp_path, pool):
    root = build_toyworld(tmp_path / "w", seed=0, num_train_dbs=3, num_dev_dbs=1)
    split = {s: json.loads((root / f"{s}.json").read_text()) for s in
             ("train", "sft", "dev", "train_tools", "dev_tools", "sft_tools", "sft_tools_blind")}
    assert split["train_tools"][: len(split["train"])] == split["train"]
    assert split["sft_tools"][: len(split["sft"])] == split["sft"] and split["dev_tools"][: len(split["dev"])] == split["dev"]
    lookups = split["train_tools"][len(split["train"]):]
    tools, blind = split["sft_tools"][len(split["sft"]):], split["sft_tools_blind"][len(split["sft"]):]
    assert len(lookups) == 9 and len(split["dev_tools"]) - len(split["dev"]) == 6
    tok = load_tokenizer(root / "tokenizer")
    for rec, trace, one_turn in zip(lookups, tools, blind):
        db = str(root / "database" / rec["db_id"] / f"{rec['db_id']}.sqlite")
        prefix = rec["question"].split("'")[1]
        stored = rec["query"].split("'")[1]
        assert prefix.islower() and stored.lower().startswith(prefix) and stored != prefix  # not in the question
        gold, wrong, like = pool.execute_many([(db, rec["query"]), (db, rec["query"].replace(stored, prefix)),
                                               (db, one_turn["query"])])
        assert gold.ok and gold.rows and wrong.rows == [] and like.rows == gold.rows
        # the tool trace's observation is exactly what the environment appends after its <sql>
        ids, own = encode_with_observations(tok, trace["cot"], 128)
        upto = trace["cot"].index("</sql>") + len("</sql>")
        head = tok.encode(trace["cot"][:upto])
        env = episodes(pool, tok, [db], max_obs_tokens=128)
        obs = env([0], [head])[0]
        assert ids[: len(head) + len(obs)] == head + obs and own[len(head) : len(head) + len(obs)] == [0.0] * len(obs)
        assert all(own[: len(head)]) and all(own[len(head) + len(obs):])


def test_rollouts_with_the_real_environment_end_at_the_budget(tokenizers, pool, db):
    """A random model never closes a <sql>: with the real env and tokenizer its rows pause on every ">" token, get
    nothing appended, and end at the budget (or a stop id) like single-turn rows."""
    from sqlr1.model import ModelConfig, Qwen2

    tok = tokenizers["toy"]
    m = Qwen2(ModelConfig(vocab_size=tok.vocab_size + 7, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1))
    m.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    env = episodes(pool, tok, [str(db)] * 6)
    calls = []

    class Recording:
        ids = env.ids

        def __call__(self, rows, generated):
            calls.append(rows)
            return env(rows, generated)

    prompt = tok.encode(" <sql>SELECT")
    out = gen(m, [prompt, prompt[:2]], 3, Recording(), max_new_tokens=40, temperature=1.0, seed=0,
              vocab_size=tok.vocab_size, stop_ids=tok.eos_ids)
    assert calls and env.turns == [[]] * 6 and all(all(m) for m in out.model_mask)
    assert all(len(t) == 40 or r == "stop" for t, r in zip(out.tokens, out.finish_reason))


def test_config_fields_are_checked():
    from sqlr1.config import TrainConfig

    assert TrainConfig().max_turns == 0  # single turn unless asked
    for bad in ({"max_turns": -1}, {"obs_rows": 0}, {"obs_max_tokens": 4}, {"query_cost": float("nan")}):
        with pytest.raises(ValueError, match="max_turns"):
            TrainConfig(**bad)


def test_train_runs_multi_turn_grpo_on_the_toy_tools_splits(tmp_path):
    """train.py end to end with max_turns > 0: SFT on traces with observations, GRPO steps with the environment,
    the per-step query metrics logged."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    world = build_toyworld(tmp_path / "world", seed=0, num_train_dbs=2, num_dev_dbs=1, train_questions_per_db=4,
                           dev_questions_per_db=2)
    run = tmp_path / "run"
    cmd = [sys.executable, str(root / "train.py"), "--config", str(root / "configs" / "grpo_tiny_tools.py"),
           f"--data_root={world}", f"--out_dir={run}", "--sft_steps=2", "--sft_batch_size=4", "--grpo_steps=2",
           "--eval_split=", "--prompts_per_step=2", "--group_size=4", "--micro_batch_size=4",
           "--max_response_len=24", "--sandbox_workers=1"]
    out = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    grpo = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"grpo"' in x]
    assert len([r for r in grpo if "query_rate" in r]) == 2
    assert all(0 <= r["query_rate"] <= 1 and r["completion_len_max"] <= 24 for r in grpo if "query_rate" in r)


def test_huge_cells_are_cut_before_they_are_converted():
    from sqlr1.sandbox import ExecResult
    from sqlr1.data import MAX_VALUE_CHARS as VALUE_CHARS
    from sqlr1.sql_env import render

    big = ExecResult("ok", [("x" * 10_000_000, b"\x00" * 5_000_000, 12345678901234567890)], 3, columns=("a", "b", "c"))
    lines = render(big, row_limit=5).splitlines()
    assert lines[0] == "a | b | c"
    cells = lines[1].split(" | ")
    assert cells[0] == "x" * VALUE_CHARS and len(cells[1]) <= VALUE_CHARS and cells[2] == "12345678901234567890"
