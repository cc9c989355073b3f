"""The toy world: determinism, answerable and informative gold SQL, a held-out split with new databases but the same
difficulty mix, a lossless tokenizer that spells a name with the same token wherever it occurs, and a tiny model that
loads like a real one."""

import json
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from sqlr1.checkpoint import load_model
from sqlr1.model import ModelConfig
from sqlr1.tokenizer import load_tokenizer
from sqlr1.toyworld import (
    CAREFUL_PLURAL, ENTITIES, MANIFEST, TEACHER_PLURAL, TEACHER_SLIP, build_toyworld, could_slip, ensure_toyworld,
    init_model, plural, plural_tables, vocabulary_words,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_train_dbs=6, num_dev_dbs=2)
JSON_FILES = (
    "train.json", "sft.json", "dev.json", "tables.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The default world (the one train.py builds), once per module."""
    return build_toyworld(tmp_path_factory.mktemp("toy") / "world", seed=0)


@pytest.fixture(scope="module")
def small_worlds(tmp_path_factory):
    base = tmp_path_factory.mktemp("small")
    return [build_toyworld(base / name, seed=seed, **SMALL) for name, seed in (("a", 0), ("b", 0), ("c", 1))]


def records(root: Path, split: str) -> list[dict]:
    return json.loads((root / f"{split}.json").read_text())


def db_path(root: Path, db_id: str) -> Path:
    return root / "database" / db_id / f"{db_id}.sqlite"


def dump(root: Path) -> dict[str, list[str]]:
    out = {}
    for path in sorted((root / "database").glob("*/*.sqlite")):
        conn = sqlite3.connect(path)
        out[path.parent.name] = list(conn.iterdump())
        conn.close()
    return out


# ---------------------------------------------------------------------------------------------- world


def test_same_seed_same_world_other_seed_other_world(small_worlds):
    a, b, c = small_worlds
    for name in JSON_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert dump(a) == dump(b)
    assert (a / "train.json").read_bytes() != (c / "train.json").read_bytes()
    assert (a / "dev.json").read_bytes() != (c / "dev.json").read_bytes()
    assert dump(a) != dump(c)


def test_layout_and_spider_schema_match_the_databases(world):
    tables = json.loads((world / "tables.json").read_text())
    manifest = json.loads((world / MANIFEST).read_text())
    by_id = {t["db_id"]: t for t in tables}
    assert len(by_id) == len(tables) == manifest["num_train_dbs"] + manifest["num_dev_dbs"]
    for schema in tables:
        conn = sqlite3.connect(db_path(world, schema["db_id"]))
        names = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid")]
        assert names == schema["table_names_original"] and 2 <= len(names) <= 3
        cols = schema["column_names_original"]
        assert cols[0] == [-1, "*"] and len(schema["column_types"]) == len(cols) == len(schema["column_names"])
        for ti, name in enumerate(names):
            info = conn.execute(f"PRAGMA table_info({name})").fetchall()
            assert [c[1] for c in info] == [n for t, n in cols if t == ti]
            assert 3 <= len(info) <= 6
            assert 40 <= conn.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0] <= 200
        assert [cols[i] for i in schema["primary_keys"]] == [[ti, f"{n}_id"] for ti, n in enumerate(names)]
        assert schema["foreign_keys"], "every database has a foreign key (JOIN questions)"
        for child, parent in schema["foreign_keys"]:
            assert cols[child][1] == cols[parent][1] == f"{names[cols[parent][0]]}_id"
            fk = conn.execute(f"PRAGMA foreign_key_list({names[cols[child][0]]})").fetchall()
            assert any(row[2] == names[cols[parent][0]] and row[3] == cols[child][1] for row in fk)
        conn.close()
    for split in ("train", "dev"):
        for r in records(world, split):
            assert set(r) == {"db_id", "question", "query", "cot", "difficulty"} and r["db_id"] in by_id


def test_sizes(world):
    manifest = json.loads((world / MANIFEST).read_text())
    train, dev = records(world, "train"), records(world, "dev")
    assert 1500 <= len(train) == manifest["train_questions"] <= 3000
    assert 200 <= len(dev) == manifest["dev_questions"] <= 300
    assert 500 <= manifest["tokenizer_size"] <= 2100


def informative(rows) -> bool:
    return bool(rows) and any(v is not None for row in rows for v in row) and rows != [(0,)]


def test_every_gold_query_runs_and_returns_rows(world):
    conns = {}
    for split in ("train", "dev"):
        seen = set()
        for r in records(world, split):
            conn = conns.setdefault(r["db_id"], sqlite3.connect(db_path(world, r["db_id"])))
            assert informative(conn.execute(r["query"]).fetchall()), r
            assert (r["db_id"], r["question"]) not in seen, r  # no duplicate questions
            seen.add((r["db_id"], r["question"]))
    for conn in conns.values():
        conn.close()


def test_wrong_comparison_or_column_changes_the_result(world):
    """Execution rewards must tell right from plausibly wrong SQL: flipping > / < changes every filter's result."""
    checked = 0
    for r in records(world, "dev"):
        if not re.search(r" [<>] \d", r["query"]):
            continue
        flipped = re.sub(r" ([<>]) (\d)", lambda m: f" {'<' if m.group(1) == '>' else '>'} {m.group(2)}", r["query"])
        conn = sqlite3.connect(db_path(world, r["db_id"]))
        assert conn.execute(flipped).fetchall() != conn.execute(r["query"]).fetchall(), r
        conn.close()
        checked += 1
    assert checked > 20


def test_questions_name_what_the_sql_uses(world):
    """Copying suffices: every table, non-key column and string value of the gold SQL is written in the question."""
    tables = {t["db_id"]: t for t in json.loads((world / "tables.json").read_text())}
    for r in records(world, "train")[:400] + records(world, "dev"):
        schema = tables[r["db_id"]]
        names = set(schema["table_names_original"]) | {n for _, n in schema["column_names_original"][1:]}
        words = set(re.findall(r"\w+", r["question"]))
        for ident in set(re.findall(r"\w+", re.sub(r"'[^']*'", "", r["query"]))) & names:
            if not ident.endswith("_id"):
                assert ident in words or plural(ident) in words, (ident, r)
        for value in re.findall(r"'([^']*)'", r["query"]):
            assert value in words, (value, r)
        for number in re.findall(r"[<>] (\d+)", r["query"]):
            assert number in words, (number, r)


def test_held_out_databases_have_new_schemas_and_values(world):
    """Same vocabulary, new databases: no held-out database has a train database's tables, no label value of one
    occurs in train, and hardly any held-out question-SQL pair occurs in train (only templates like "How many
    flights are there?" can repeat)."""
    tables = {t["db_id"]: t for t in json.loads((world / "tables.json").read_text())}
    train, dev = records(world, "train"), records(world, "dev")
    train_ids, dev_ids = {r["db_id"] for r in train}, {r["db_id"] for r in dev}
    assert train_ids and dev_ids and not train_ids & dev_ids
    table_sets = lambda ids: {frozenset(tables[i]["table_names_original"]) for i in ids}  # noqa: E731
    assert not table_sets(train_ids) & table_sets(dev_ids)

    def label_values(ids):  # column 1 of every table is its unique label (name, title, ...)
        out = set()
        for i in ids:
            conn = sqlite3.connect(db_path(world, i))
            for table in tables[i]["table_names_original"]:
                label = [c[1] for c in conn.execute(f"PRAGMA table_info({table})")][1]
                out |= {v for (v,) in conn.execute(f"SELECT {label} FROM {table}")}
            conn.close()
        return out

    assert not label_values(train_ids) & label_values(dev_ids)
    seen = {(r["question"], r["query"]) for r in train}
    assert sum((r["question"], r["query"]) in seen for r in dev) <= 0.05 * len(dev)


def test_teacher_answers_the_train_questions_with_habitual_slips_that_execution_can_see(world):
    """sft.json: the train questions with the gold trace and SQL, except the teacher's three habitual mistakes, each
    made with probability TEACHER_SLIP where it applies. A slipped query still runs but returns another result
    (so GRPO's execution reward can tell it from the gold one)."""
    train, sft = records(world, "train"), records(world, "sft")
    assert [(r["db_id"], r["question"], r["difficulty"]) for r in train] == [
        (r["db_id"], r["question"], r["difficulty"]) for r in sft]
    slips = {"star": [0, 0], "direction": [0, 0], "average": [0, 0]}  # [made, could have been made]
    conns = {}
    for gold, taught in zip(train, sft):
        g, t = gold["query"], taught["query"]
        low_end = (" < ", " ASC", "MIN(")
        kinds = {
            "star": (bool(re.match(r"SELECT (T1\.)?\w+ FROM", g)), bool(re.match(r"SELECT (T1\.)?\* FROM", t))),
            "direction": (any(x in g for x in low_end), any(x in g and x not in t for x in low_end)),
            "average": ("AVG(" in g, "AVG(" in g and "SUM(" in t),
        }
        for kind, (applies, made) in kinds.items():
            slips[kind][0] += made
            slips[kind][1] += applies
            assert applies or not made
        if g == t:
            assert taught["cot"] == gold["cot"]
            continue
        conn = conns.setdefault(gold["db_id"], sqlite3.connect(db_path(world, gold["db_id"])))
        assert sorted(map(repr, conn.execute(t).fetchall())) != sorted(map(repr, conn.execute(g).fetchall())), (g, t)
    for kind, (made, applicable) in slips.items():
        assert applicable >= 100 and abs(made / applicable - TEACHER_SLIP) < 0.08, (kind, made, applicable)


def test_noisy_teacher_adds_plural_table_names_that_fail_to_execute(world):
    """sft_noisy.json: sft.json's records, except that with probability TEACHER_PLURAL every table of the SQL is
    named in the plural, as the question names it, and then the query fails (S_e = -2), unlike sft.json's slips."""
    sft, noisy = records(world, "sft"), records(world, "sft_noisy")
    assert len(noisy) == len(sft)
    changed = [(a, b) for a, b in zip(sft, noisy) if a != b]
    assert abs(len(changed) / len(sft) - TEACHER_PLURAL) < 0.05
    conns = {}
    for a, b in changed:
        assert {k: v for k, v in a.items() if k != "query"} == {k: v for k, v in b.items() if k != "query"}
        tables = re.findall(r"\b(?:FROM|JOIN) (\w+)", a["query"])
        assert re.findall(r"\b(?:FROM|JOIN) (\w+)", b["query"]) == [plural(t) for t in tables]
        assert re.sub(r"\b(FROM|JOIN) (\w+)s\b", r"\1 \2", b["query"]) == a["query"]
        conn = conns.setdefault(a["db_id"], sqlite3.connect(db_path(world, a["db_id"])))
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            conn.execute(b["query"])


def test_careful_teacher_names_tables_in_the_plural_where_it_avoided_a_habit_and_those_fail(world):
    """sft_careful.json: sft.json's records, except that where the teacher could have made a habitual mistake and
    made none, with probability CAREFUL_PLURAL every table of the SQL is named in the plural, and then the query
    fails: the right idea often errors, the habitual wrong one always runs."""
    train, sft, careful = records(world, "train"), records(world, "sft"), records(world, "sft_careful")
    assert len(careful) == len(sft) == len(train)
    avoided = [i for i, (g, t) in enumerate(zip(train, sft)) if g["query"] == t["query"] and could_slip(g["query"])]
    changed = [i for i, (a, b) in enumerate(zip(sft, careful)) if a != b]
    assert set(changed) <= set(avoided) and len(avoided) >= 200
    assert abs(len(changed) / len(avoided) - CAREFUL_PLURAL) < 0.08
    conns = {}
    for i in changed:
        a, b = sft[i], careful[i]
        assert {k: v for k, v in a.items() if k != "query"} == {k: v for k, v in b.items() if k != "query"}
        assert b["query"] == plural_tables(a["query"]) and b["query"] != a["query"]
        conn = conns.setdefault(a["db_id"], sqlite3.connect(db_path(world, a["db_id"])))
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            conn.execute(b["query"])


def test_held_out_is_not_easier(world):
    train, dev = records(world, "train"), records(world, "dev")
    share = lambda rs, d: sum(r["difficulty"] == d for r in rs) / len(rs)  # noqa: E731
    for level in ("easy", "medium", "hard"):
        assert share(train, level) > 0.15
        assert abs(share(dev, level) - share(train, level)) <= 0.03, level
    shape = lambda rs: Counter(re.sub(r"\w+|'[^']*'", "x", r["query"]) for r in rs)  # noqa: E731
    train_shapes, dev_shapes = shape(train), shape(dev)
    assert set(dev_shapes) <= set(train_shapes)
    mean_len = lambda rs: sum(len(r["query"].split()) for r in rs) / len(rs)  # noqa: E731
    assert mean_len(dev) >= 0.95 * mean_len(train)


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_any_text_and_keeps_special_tokens_whole(world):
    tok = load_tokenizer(world / "tokenizer")
    rng = random.Random(0)
    alphabet = "abcXYZ019 _'\"\n\t.,;:()*<>=|!?`-" + "éßñ中文字😀\u200b\r"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>"]
    for _ in range(300):
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(rng.randint(1, 6))]
        text = "".join(p + (rng.choice(specials) if rng.random() < 0.3 else "") for p in pieces)
        assert tok.decode(tok.encode(text)) == text
    for s in specials:
        sid = tok.token_to_id(s)
        assert sid is not None and tok.encode(f"x{s}y") == tok.encode("x") + [sid] + tok.encode("y")
    assert tok.token_to_id("<|im_end|>") in tok.eos_ids and tok.pad_id == tok.token_to_id("<|endoftext|>")
    assert tok.default_system == "You are a helpful assistant."
    sample = records(world, "dev")[0]
    assert tok.decode(tok.encode(sample["query"])) == sample["query"]


def test_a_name_is_one_token_wherever_it_is_written(world):
    """" price", "(price" and "T1.price" hold the same name token, and " flights" is " flight" + "s": the token a
    question uses is the token the SQL needs, so copying it is all a model has to learn."""
    tok = load_tokenizer(world / "tokenizer")
    for word in sorted(vocabulary_words()):
        whole = tok.encode(" " + word)
        if not word.endswith("s"):  # a final "s" is a piece of its own (" status" = " statu" + "s")
            assert len(whole) == 1, word
        for before, after in (("(", ")"), (".", " =")):
            assert tok.encode(before + word + after) == tok.encode(before) + tok.encode(word) + tok.encode(after), word
    for noun in ENTITIES:
        assert tok.encode(" " + plural(noun)) == tok.encode(" " + noun) + tok.encode("s"), noun


def test_held_out_text_uses_tokens_the_train_split_uses(world):
    """Nearly every token of dev questions, SQL, traces and schemas occurs in the train split's text, more than
    twice (a token train never shows would keep its random embedding)."""
    tok = load_tokenizer(world / "tokenizer")

    def texts(split):
        rs = records(world, split)
        schemas = []
        for db_id in sorted({r["db_id"] for r in rs}):
            conn = sqlite3.connect(db_path(world, db_id))
            schemas += [sql for (sql,) in conn.execute("SELECT sql FROM sqlite_master")]
            conn.close()
        return schemas + [t for r in rs for t in (r["question"], r["query"], r["cot"])]

    train_counts = Counter(i for t in texts("train") for i in tok.encode(t))
    dev_ids = [i for t in texts("dev") for i in tok.encode(t)]
    rare = [i for i in dev_ids if train_counts[i] < 3]
    assert len(rare) <= 0.01 * len(dev_ids), Counter(map(tok.decode, map(lambda i: [i], rare))).most_common(10)


# ---------------------------------------------------------------------------------------------- model


def test_init_model_saves_a_loadable_tiny_qwen2_with_padded_vocab(world, tmp_path):
    out = init_model(tmp_path / "model", world / "tokenizer", seed=0)
    tok = load_tokenizer(out)
    model = load_model(out, dtype=torch.float32)
    assert model.config.vocab_size > tok.vocab_size and model.config.vocab_size % 64 == 0
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 4
    ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": "How many planets?"}]))])
    assert model(ids).shape == (1, ids.shape[1], model.config.vocab_size)
    again = load_model(init_model(tmp_path / "again", world / "tokenizer", seed=0), dtype=torch.float32)
    other = load_model(init_model(tmp_path / "other", world / "tokenizer", seed=1), dtype=torch.float32)
    w = "embed_tokens.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])
    with pytest.raises(ValueError, match="vocab_size"):
        init_model(tmp_path / "small", world / "tokenizer", config=ModelConfig(vocab_size=64, hidden_size=32,
                   intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        init_model(tmp_path / "none", tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- ensure


def test_ensure_builds_once_and_rebuilds_when_outdated(tmp_path):
    root = tmp_path / "toyworld"
    assert ensure_toyworld(root, seed=0) == root
    (root / "model_seed0").mkdir()  # what train.py adds next to the world
    first = (root / "train.json").stat().st_mtime_ns
    ensure_toyworld(root, seed=0)
    assert (root / "model_seed0").is_dir() and (root / "train.json").stat().st_mtime_ns == first
    manifest = json.loads((root / MANIFEST).read_text())
    (root / MANIFEST).write_text(json.dumps({**manifest, "format_version": -1}))
    (root / "model_seed0" / "model.safetensors").write_text("a trained model")
    (root / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"format -1, seed 0.*would delete notes.txt: move those out"):
        ensure_toyworld(root, seed=0)  # an outdated world is never rebuilt over files it did not generate
    assert (root / "model_seed0" / "model.safetensors").read_text() == "a trained model"
    shutil.move(root / "notes.txt", tmp_path / "kept")
    ensure_toyworld(root, seed=0)  # generated files and model_seed0 (same tokenizer: carried over): rebuilt
    assert json.loads((root / MANIFEST).read_text()) == manifest
    assert (root / "model_seed0" / "model.safetensors").read_text() == "a trained model"
    # a rebuild that changes the tokenizer refuses to carry a model made with the old one, and deletes nothing
    (root / MANIFEST).write_text(json.dumps({**manifest, "format_version": -1}))
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"holds model_seed0, made with the old world's tokenizer"):
        ensure_toyworld(root, seed=0)
    assert (root / "model_seed0" / "model.safetensors").read_text() == "a trained model"
    assert (root / "tokenizer" / "tokenizer.json").read_text() == "{}"
    shutil.rmtree(root / "model_seed0")
    ensure_toyworld(root, seed=0)
    ensure_toyworld(root, seed=1)
    assert json.loads((root / MANIFEST).read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "toyworld"]  # no temporary directories left


def test_damaged_manifest_or_a_file_is_named(tmp_path):
    root = build_toyworld(tmp_path / "world", **SMALL)
    (root / MANIFEST).write_text('{"format_version": 2, "se')
    with pytest.raises(ValueError, match=rf"{root / MANIFEST}: damaged toy world manifest \(not valid JSON"):
        ensure_toyworld(root)
    (root / MANIFEST).write_text("[2]")
    with pytest.raises(ValueError, match="a JSON list, not an object"):
        ensure_toyworld(root)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a toy world folder"):
        ensure_toyworld(tmp_path / "file")


def test_interrupted_build_leaves_no_temporary_folder(tmp_path):
    code = f"from sqlr1.toyworld import ensure_toyworld; ensure_toyworld({str(tmp_path / 'world')!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".world.building-*")):  # the build is under way
        assert proc.poll() is None and time.time() < deadline, "the build never started"
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err  # stopped mid-build (not finished)
    assert list(tmp_path.iterdir()) == []


def test_train_on_a_non_toy_data_root_is_one_line(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/grpo_tiny.py",
                          f"--data_root={tmp_path / 'mine'}", f"--out_dir={tmp_path / 'run'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: ensure_toyworld:") and "not a toy world" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # and no run directory was created


def test_refuses_to_overwrite_other_directories(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        ensure_toyworld(tmp_path / "mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_toyworld(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_transformers_renders_the_same_chat(world):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(world / "tokenizer"))
    ours = load_tokenizer(world / "tokenizer")
    for messages in ([{"role": "user", "content": "How many planets?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}]):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == ours.apply_chat_template(messages)
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
