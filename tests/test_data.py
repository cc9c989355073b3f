"""Data loaders, schema text, token budgets, prompts, SFT targets and RL filters, on real SQLite files.

Real Spider dev / BIRD mini-dev files (Yu et al. 2018; Li et al. 2023; CC BY-SA 4.0) are used when present in the
shared data folder next to the repository; the tests that need them skip cleanly otherwise.
"""

from __future__ import annotations

import json
import sqlite3
import warnings
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from sqlr1 import data
from sqlr1.data import (
    EVIDENCE_SECTION, MAX_VALUE_CHARS, SHORT_PROMPT, SQL_ONLY_THINK, SQLR1_PROMPT, Example, Prompt, build_prompt,
    filter_for_rl, fit_schema, load_bird, load_dataset, load_spider, load_synsql, schema_text, sft_response,
    table_names,
)
from sqlr1.sandbox import Sandbox
from sqlr1.tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPIDER, BIRD = SHARED / "spider", SHARED / "bird_minidev"
LONG_NOTE = "a note much longer than the example value limit, " * 3


# ------------------------------------------------------------------------------------------------------ fixtures


def make_shop(path: Path) -> Path:
    """A small database with the awkward parts: keywords and spaces in names, a composite key, foreign keys,
    NULLs, empty strings, blobs, long strings, an AUTOINCREMENT table (so sqlite_sequence exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE customer (id INTEGER PRIMARY KEY AUTOINCREMENT, "first name" TEXT, city TEXT, photo BLOB);
        CREATE TABLE "order" (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customer(id), amount REAL,
                              "group" TEXT, note TEXT);
        CREATE TABLE order_line (order_id INTEGER, line INTEGER, product TEXT, qty,
                                 PRIMARY KEY (order_id, line), FOREIGN KEY (order_id) REFERENCES "order"(id));
    """)
    conn.executemany('INSERT INTO customer ("first name", city, photo) VALUES (?, ?, ?)',
                     [("Ann", "Oslo", b"\x00\x01"), ("Bob", None, None), ("Cid", "", b"\x02"), ("Dee", "Oslo", None),
                      ("Eve", "Rome", None)])
    conn.executemany('INSERT INTO "order" VALUES (?, ?, ?, ?, ?)',
                     [(i, 1 + i % 5, 10.5 * i, "ab"[i % 2], LONG_NOTE if i == 1 else None) for i in range(1, 9)])
    conn.executemany("INSERT INTO order_line VALUES (?, ?, ?, ?)",
                     [(1 + i // 3, i % 3, f"product {i}", i) for i in range(20)])
    conn.commit()
    conn.close()
    return path


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    return make_shop(tmp_path_factory.mktemp("spider") / "database" / "shop" / "shop.sqlite")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small byte-level BPE with Qwen's ChatML special tokens, written as tokenizer.json and loaded by sqlr1."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [SQLR1_PROMPT, SHORT_PROMPT, "SELECT count(*) FROM customer WHERE city = 'Oslo'"] * 5
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return load_tokenizer(out)


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def shop_example(shop: Path, **kw) -> Example:
    fields = dict(question="How many customers live in Oslo?", db_id="shop", db_path=shop,
                  sql="SELECT count(*) FROM customer WHERE city = 'Oslo'")
    return Example(**(fields | kw))


# ---------------------------------------------------------------------------------------------- real data sets


@pytest.mark.skipif(not (SPIDER / "dev.json").is_file(), reason="Spider dev not in the shared data folder")
def test_spider_dev_skips_exactly_the_examples_without_a_database():
    records = json.loads((SPIDER / "dev.json").read_text())
    absent = {r["db_id"] for r in records if not (SPIDER / "database" / r["db_id"] / f"{r['db_id']}.sqlite").is_file()}
    n_absent = sum(r["db_id"] in absent for r in records)
    if not absent:
        pytest.skip("every Spider dev database is present: nothing to skip")
    with pytest.warns(UserWarning, match=f"skipped {n_absent} of {len(records)} examples") as caught:
        examples = load_dataset("spider", SPIDER, "dev")
    assert len([w for w in caught if "skipped" in str(w.message)]) == 1
    assert len(examples) == len(records) - n_absent
    assert not {ex.db_id for ex in examples} & absent
    kept = [r for r in records if r["db_id"] not in absent]
    assert [(ex.question, ex.sql, ex.db_id) for ex in examples] == [
        (r["question"], r["query"], r["db_id"]) for r in kept]
    assert all(ex.db_path.is_file() and ex.evidence == "" and ex.reasoning is None for ex in examples)
    with pytest.raises(FileNotFoundError, match=rf"{sorted(absent)[0]}\.sqlite"):
        load_spider(SPIDER, "dev", skip_missing=False)


@pytest.mark.skipif(not (BIRD / "mini_dev_sqlite.json").is_file(), reason="BIRD mini-dev not in the shared folder")
def test_bird_minidev_fields_and_missing_databases():
    records = json.loads((BIRD / "mini_dev_sqlite.json").read_text())
    examples = load_dataset("bird", BIRD, "mini_dev", require_db=False)
    assert [(ex.question, ex.evidence, ex.sql, ex.difficulty, ex.db_id) for ex in examples] == [
        (r["question"], r.get("evidence") or "", r["SQL"], r["difficulty"], r["db_id"]) for r in records]
    assert sum(bool(ex.evidence) for ex in examples) > len(examples) // 2
    assert {ex.difficulty for ex in examples} <= {"simple", "moderate", "challenging"}
    assert examples[0].db_path == BIRD / "dev_databases" / examples[0].db_id / f"{examples[0].db_id}.sqlite"
    assert len(load_bird(BIRD, "dev", require_db=False)) == len(records)  # "dev" falls back to the mini-dev file
    if not examples[0].db_path.is_file():  # the shared copy has no databases
        with pytest.raises(FileNotFoundError, match=str(examples[0].db_path)):
            load_bird(BIRD, "mini_dev", skip_missing=False)
        with pytest.raises(ValueError, match=f"no usable examples in {len(records)} records: the databases of all"):
            load_bird(BIRD, "mini_dev")  # nothing to train or score on is an error, not an empty data set


# --------------------------------------------------------------------------------------- loaders on made files


def test_spider_layout_with_cot_train_fallback_and_bad_records(tmp_path):
    make_shop(tmp_path / "database" / "shop" / "shop.sqlite")
    write_json(tmp_path / "train_spider.json", [
        {"db_id": "shop", "question": "Count customers.", "query": "SELECT count(*) FROM customer",
         "cot": "Count the rows of customer.", "difficulty": "easy"},
        {"db_id": "shop", "question": "List cities.", "query": "SELECT city FROM customer"},
    ])
    first, second = load_dataset("spider", tmp_path, "train")
    assert first == Example("Count customers.", "shop", tmp_path / "database/shop/shop.sqlite",
                            "SELECT count(*) FROM customer", "", "Count the rows of customer.", "easy")
    assert (second.reasoning, second.difficulty, second.evidence) == (None, None, "")

    write_json(tmp_path / "dev.json", [{"db_id": "shop", "question": "q", "query": "SELECT 1"},
                                       {"db_id": "shop", "question": "q"}])
    with pytest.raises(ValueError, match=r"dev\.json: record 1 has no field 'query'"):
        load_spider(tmp_path, "dev")
    write_json(tmp_path / "dev.json", [{"db_id": "shop", "question": 7, "query": "SELECT 1"}])
    with pytest.raises(ValueError, match=r"record 0: field 'question' must be a string"):
        load_spider(tmp_path, "dev")
    write_json(tmp_path / "dev.json", [{"db_id": "../shop", "question": "q", "query": "SELECT 1"}])
    with pytest.raises(ValueError, match="not a plain database name"):
        load_spider(tmp_path, "dev")
    (tmp_path / "dev.json").write_text('[{"db_id": "shop",\n "question": }]')
    with pytest.raises(ValueError, match=r"dev\.json: not valid JSON at line 2"):
        load_spider(tmp_path, "dev")
    with pytest.raises(FileNotFoundError, match="test.json"):
        load_spider(tmp_path, "test")
    with pytest.raises(ValueError, match="unknown data set 'wikisql'"):
        load_dataset("wikisql", tmp_path, "dev")


def test_synsql_json_jsonl_and_parquet(tmp_path):
    make_shop(tmp_path / "databases" / "shop" / "shop.sqlite")
    records = [
        {"db_id": "shop", "question": "Total amount?", "external_knowledge": "amount is in euros",
         "sql": 'SELECT sum(amount) FROM "order"', "cot": "Sum the amount column.", "sql_complexity": "Simple"},
        {"db_id": "gone", "question": "Anything?", "external_knowledge": "", "sql": "SELECT 1", "cot": "Nothing.",
         "sql_complexity": "Moderate"},
    ]
    write_json(tmp_path / "data.json", records)
    (tmp_path / "part.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 .*gone\.sqlite"):
        from_json = load_dataset("synsql", tmp_path, "train")  # no train.json: data.json
    assert from_json == [Example("Total amount?", "shop", tmp_path / "databases/shop/shop.sqlite",
                                 'SELECT sum(amount) FROM "order"', "amount is in euros", "Sum the amount column.",
                                 "Simple")]
    with pytest.warns(UserWarning):
        assert load_synsql(tmp_path / "part.jsonl", tmp_path / "databases") == from_json
    assert len(load_dataset("synsql", tmp_path, "part", require_db=False)) == 2
    (tmp_path / "bad.jsonl").write_text(json.dumps(records[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        load_synsql(tmp_path / "bad.jsonl", tmp_path / "databases")
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_synsql(tmp_path / "nothing.json", tmp_path / "databases")
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        (tmp_path / "data.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            load_synsql(tmp_path / "data.parquet", tmp_path / "databases")
    else:
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records[:1]), tmp_path / "data.parquet")
        assert load_synsql(tmp_path / "data.parquet", tmp_path / "databases") == from_json


# ------------------------------------------------------------------------------------------------- schema text


def columns_and_keys(conn: sqlite3.Connection, table: str):
    cols = [(c[1], c[2], c[5]) for c in conn.execute(f'PRAGMA table_info("{table}")')]
    fks = sorted(tuple(f[2:5]) for f in conn.execute(f'PRAGMA foreign_key_list("{table}")'))
    return cols, fks


def test_schema_text_rebuilds_the_database_schema(shop):
    text = schema_text(shop, sample_values=3)
    data._table_statements.cache_clear()
    assert schema_text(shop, sample_values=3) == text  # recomputed from the file, identical
    assert table_names(shop) == ["customer", "order", "order_line"]  # creation order, no sqlite_sequence
    assert "sqlite_sequence" not in text
    assert text.index("CREATE TABLE customer") < text.index("CREATE TABLE `order`") < text.index("order_line (")
    assert "`first name` TEXT" in text and "`group` TEXT" in text and "  city TEXT" in text

    # The text is valid SQLite (comments included) and recreates the same columns, types and keys.
    original, rebuilt = sqlite3.connect(shop), sqlite3.connect(":memory:")
    rebuilt.executescript(text)
    for table in table_names(shop):
        assert columns_and_keys(rebuilt, table) == columns_and_keys(original, table)
    original.close()

    lines = {line.split()[0]: line for line in text.splitlines() if "-- example:" in line}
    assert lines["city"].endswith("-- example: ['Oslo', 'Rome']")  # distinct, no NULL, no ''
    assert "photo" not in lines  # blobs are not shown
    assert "-- example: [1, 2, 3]" in lines["id"]  # at most k values
    assert f"['{LONG_NOTE[:MAX_VALUE_CHARS]}']" in lines["note"]
    assert all(len(v) <= MAX_VALUE_CHARS for line in lines.values() for v in line.split("'")[1::2])
    assert "-- example" not in schema_text(shop)
    assert schema_text(shop, tables=["order_line", "customer"]) == "\n\n".join(
        schema_text(shop).split("\n\n")[i] for i in (0, 2))
    with pytest.raises(ValueError, match="nope"):
        schema_text(shop, tables=["nope"])
    with pytest.raises(FileNotFoundError, match="missing.sqlite"):
        schema_text(shop.parent / "missing.sqlite")


def test_schema_text_opens_databases_read_only(tmp_path):
    db = make_shop(tmp_path / "ro" / "shop.sqlite")
    db.chmod(0o444)
    db.parent.chmod(0o555)  # no journal could be created here
    try:
        assert "CREATE TABLE customer" in schema_text(db, 2)
        assert sorted(p.name for p in db.parent.iterdir()) == ["shop.sqlite"]
    finally:
        db.parent.chmod(0o755)


def test_fit_schema_drops_values_then_last_tables(shop, tokenizer):
    count = lambda text: len(tokenizer.encode(text))  # noqa: E731
    full, bare = schema_text(shop, 3), schema_text(shop, 0)
    assert count(full) > count(bare)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fitting: no warning
        assert fit_schema(shop, count, count(full), 3) == (full, [])

    with pytest.warns(UserWarning, match=r"dropped example values and 0 tables"):
        assert fit_schema(shop, count, count(full) - 1, 3) == (bare, [])
    two = schema_text(shop, 0, ["customer", "order"])
    with pytest.warns(UserWarning, match=r"dropped example values and 1 tables \['order_line'\]"):
        assert fit_schema(shop, count, count(bare) - 1, 3) == (two, ["order_line"])
    with pytest.warns(UserWarning, match=r"\['order', 'order_line'\]"):
        text, dropped = fit_schema(shop, count, count(two) - 1, 0)
    assert dropped == ["order", "order_line"] and text == schema_text(shop, 0, ["customer"])
    with pytest.warns(UserWarning):
        assert fit_schema(shop, count, 3, 3) == ("", ["customer", "order", "order_line"])


# ------------------------------------------------------------------------------------------------------ prompts


def test_build_prompt_renders_chatml_with_prefilled_think(shop, tokenizer):
    ex = shop_example(shop)
    prompt = build_prompt(ex, tokenizer, sample_values=2)
    assert isinstance(prompt, Prompt) and prompt.dropped_tables == []
    assert prompt.text.endswith("<|im_start|>assistant\n<think>\n")
    assert prompt.text.startswith("<|im_start|>system\n")  # the tokenizer's default system turn
    assert prompt.ids == tokenizer.encode(prompt.text)
    assert tokenizer.decode(prompt.ids) == prompt.text
    assert schema_text(shop, 2) in prompt.text and ex.question in prompt.text
    assert "SQLite" in prompt.text and "External Knowledge" not in prompt.text

    hinted = build_prompt(shop_example(shop, evidence="Oslo is a city"), tokenizer, system="Be exact.")
    assert EVIDENCE_SECTION.format(evidence="Oslo is a city") in hinted.text
    assert hinted.text.startswith("<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\n")
    assert "-- example" not in hinted.text

    short = build_prompt(ex, tokenizer, SHORT_PROMPT)
    assert short.text.endswith("<|im_start|>assistant\n<think>\n")
    assert len(short.ids) < len(build_prompt(ex, tokenizer).ids) - 100
    with pytest.raises(ValueError, match="template field 'db'"):
        build_prompt(ex, tokenizer, "{db}: {question}")


def test_build_prompt_respects_the_token_budget(shop, tokenizer):
    ex = shop_example(shop)
    full = build_prompt(ex, tokenizer, sample_values=3)
    bare = build_prompt(ex, tokenizer, sample_values=0)
    with pytest.warns(UserWarning, match="dropped example values and 0 tables"):
        assert build_prompt(ex, tokenizer, max_prompt_tokens=len(full.ids) - 1, sample_values=3) == bare
    with pytest.warns(UserWarning, match="order_line"):
        cut = build_prompt(ex, tokenizer, max_prompt_tokens=len(bare.ids) - 1, sample_values=3)
    assert cut.dropped_tables == ["order_line"] and len(cut.ids) <= len(bare.ids) - 1
    assert "CREATE TABLE customer" in cut.text and "order_line" not in cut.text
    assert cut.text.endswith("<|im_start|>assistant\n<think>\n")
    with pytest.warns(UserWarning):
        hopeless = build_prompt(ex, tokenizer, max_prompt_tokens=10)
    assert hopeless.dropped_tables == table_names(shop) and len(hopeless.ids) > 10


def test_an_over_long_question_is_blamed_not_the_schema(shop, tokenizer):
    ex = shop_example(shop, question="How many customers live in Oslo? " * 3000)  # ~100 KB
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompt = build_prompt(ex, tokenizer, max_prompt_tokens=512)
    [message] = [str(w.message) for w in caught]
    over = len(prompt.ids) - 512
    assert "question" in message and "too long" in message and f"{over} over max_prompt_tokens=512" in message
    assert "dropped" not in message and "schema" in message  # "even without the schema": it is not to blame
    assert prompt.dropped_tables == table_names(shop)  # what filter_for_rl then drops


def test_a_lone_surrogate_is_named_and_skipped(tmp_path, shop, tokenizer):
    make_shop(tmp_path / "database" / "shop" / "shop.sqlite")
    write_json(tmp_path / "dev.json", [{"db_id": "shop", "question": "Count customers.", "query": "SELECT 1"},
                                       {"db_id": "shop", "question": "Caf\udcff?", "query": "SELECT 2"}])
    with pytest.warns(UserWarning, match=r"dev\.json: skipped 1 of 2 examples .*not valid Unicode.*record 1 \(question"):
        [kept] = load_spider(tmp_path, "dev")
    assert kept.question == "Count customers." and build_prompt(kept, tokenizer).ids
    write_json(tmp_path / "dev.json", [{"db_id": "shop", "question": "Caf\udcff?", "query": "SELECT 2"}])
    with pytest.raises(ValueError, match="no usable examples in 1 records: their text is not valid Unicode"):
        load_spider(tmp_path, "dev")
    with pytest.raises(ValueError, match=r"example \(shop: 'Caf.*question is not valid Unicode"):
        build_prompt(shop_example(shop, question="Caf\udcff?"), tokenizer)  # e.g. a --question from sample.py


def test_sft_response_parses_as_a_well_formed_completion(shop, tokenizer):
    reward = pytest.importorskip("sqlr1.reward")
    for reasoning in ("Filter customer on city, then count.", None):
        ex = shop_example(shop, reasoning=reasoning)
        prompt = build_prompt(ex, tokenizer)
        response = sft_response(ex)
        assert response.startswith(reasoning or SQL_ONLY_THINK)
        assert response.endswith("```\n</answer>")
        full = tokenizer.decode(prompt.ids + tokenizer.encode(response))
        assert full == prompt.text + response
        parsed = reward.parse_response(full[len(prompt.text):])
        assert parsed.format_ok and parsed.sql == ex.sql
        assert parsed.think == (reasoning or SQL_ONLY_THINK)
    with pytest.raises(ValueError, match="</think>"):
        sft_response(shop_example(shop, reasoning="done </think> early"))


# --------------------------------------------------------------------------------------------------- RL filters


def test_filter_for_rl_drops_long_prompts_and_bad_golds(shop, tokenizer):
    golds = [
        "SELECT count(*) FROM customer WHERE city = 'Oslo'",  # kept
        "SELECT name FROM customer",  # no such column: gold_error
        "SELECT id FROM customer WHERE city = 'Paris'",  # no rows: gold_empty
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",  # gold_timeout
        "SELECT city FROM customer",  # kept
        "SELECT count(*) FROM customer",  # prompt too long (long question)
    ]
    examples = [shop_example(shop, sql=sql) for sql in golds]
    examples[5] = shop_example(shop, sql=golds[5], question="How many customers are there? " * 40)
    prompts = [build_prompt(ex, tokenizer, SHORT_PROMPT) for ex in examples]
    limit = max(len(p.ids) for p in prompts[:5])
    assert len(prompts[5].ids) > limit
    with Sandbox(num_workers=2, timeout=5.0) as sandbox:
        kept, counts = filter_for_rl(examples, prompts, sandbox, limit, timeout=0.3)
        assert kept == [0, 4]
        assert counts == {"prompt_too_long": 1, "gold_error": 1, "gold_timeout": 1, "gold_empty": 1}
        kept, counts = filter_for_rl(examples[:3], prompts[:3], sandbox, limit, drop_empty_gold=False)
        assert kept == [0, 2] and counts["gold_empty"] == 0 and counts["gold_error"] == 1
    with pytest.raises(ValueError, match="3 examples but 2 prompts"):
        filter_for_rl(examples[:3], prompts[:2], None, limit)


def test_unreadable_inputs_are_named(tmp_path):
    (tmp_path / "dev.json").write_bytes(b'[{"question": "caf\xe9"}]')  # latin-1, not UTF-8
    with pytest.raises(ValueError, match="dev.json: not UTF-8"):
        load_spider(tmp_path, "dev")
    write_json(tmp_path / "dev.json", [])
    with pytest.raises(ValueError, match="dev.json: no usable examples in 0 records: it is empty"):
        load_spider(tmp_path, "dev")
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="garbage.sqlite: cannot read its schema"):
        schema_text(garbage)
    empty = tmp_path / "empty.sqlite"
    sqlite3.connect(empty).close()
    with pytest.raises(ValueError, match="empty.sqlite has no tables"):
        schema_text(empty)


def test_schema_quotes_names_sqlite_reads_as_something_else(tmp_path):
    """`current_date` is a valid bare name to SQLite, but it means today's date: the schema must quote it."""
    path = tmp_path / "d.sqlite"
    conn = sqlite3.connect(path)
    conn.execute('CREATE TABLE t ("current_date" TEXT, "order" INT, plain INT)')
    conn.execute("INSERT INTO t VALUES ('1999-01-01', 1, 2)")
    conn.commit()
    text = schema_text(path)
    assert "`current_date`" in text and "`order`" in text and "`plain`" not in text
    assert conn.execute("SELECT `current_date` FROM t").fetchall() == [("1999-01-01",)]
    conn.close()
