"""The toy world: a miniature, procedurally generated Spider plus a tiny Qwen2, for running SQL-R1 on a laptop CPU.

`python train.py --config configs/grpo_tiny.py` builds it and runs the whole pipeline (cold-start SFT -> GRPO on
execution rewards -> evaluation) through the code paths of a 7B run: Spider loader, schema text from the SQLite
file, ChatML, sandboxed execution, HF checkpoints. A world is Spider's layout (database/<db_id>/<db_id>.sqlite,
tables.json, train.json, dev.json), a byte-level BPE tokenizer/, the manifest toyworld.json, and cold-start data:
sft.json (an imperfect teacher, see teacher_answer), sft_noisy.json and sft_careful.json (the RL lab's, see
teacher_plural_slip, teacher_careful_plural), and the *_tools splits (lookup questions for multi-turn rollouts).

Why it is built this way:
- Held-out databases recombine the train vocabulary with rows of their own (label values never occur in train), as
  Spider's dev databases recombine English words the model knows: held-out EX measures whether the model reads the
  question and the schema and copies their names and values into SQL.
- Questions are templated (easy / medium / hard, the same plan for every database) and name tables, columns and
  values literally, so copying suffices. A question is kept only if its gold result is non-empty and has no tie at
  a LIMIT, so plausible wrong SQL gives another result and the execution reward is informative.
- The tokenizer's split (TOY_SPLIT) makes every vocabulary word one token in each of its spellings, so copying a
  name is copying one token, which a 4-layer model learns within a few hundred SFT steps.
- The model is a 4-layer Qwen2 whose vocabulary is padded to a multiple of 64 (like Qwen's 151,936 rows for
  151,665 tokens), so the masking of padded rows runs for real.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from sqlr1.checkpoint import save_model
from sqlr1.model import ModelConfig, Qwen2
from sqlr1.reward import RESPONSE_TAGS
from sqlr1.sandbox import ExecResult
from sqlr1.sql_env import OBS_CLOSE, OBS_OPEN, render
from sqlr1.tokenizer import load_tokenizer

FORMAT_VERSION = 5  # written to the manifest: ensure_toyworld rebuilds a world written in another format
MANIFEST = "toyworld.json"
TOOL_SPLITS = ("train_tools", "dev_tools", "sft_tools", "sft_tools_blind")
# Everything build_toyworld writes at the top of a world: a rebuild may replace these, and only these.
GENERATED = frozenset({"database", "tables.json", "train.json", "dev.json", "sft.json", "sft_noisy.json",
                       "sft_careful.json", "tokenizer",
                       MANIFEST, *(f"{s}.json" for s in TOOL_SPLITS)})
SYSTEM_MESSAGE = "You are a helpful assistant."
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split (contractions, words, single digits, punctuation runs) with two changes that let a
# name in the SQL be the very token the question uses: only a space may lead a word (Qwen's "(price" and ".price"
# would be tokens other than " price"; here they are "(" + "price"), and a final "s" of a word of 4+ letters is a
# piece of its own (" flights" = " flight" + "s").
TOY_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)| ?\p{L}{3,}?(?=s\b)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# The vocabulary of the prompts and answers around schema and question (data.py's templates, ChatML roles): BPE
# merges for these words keep every prompt short. A paraphrase, not the templates themselves: exact wording is not needed.
PROMPT_WORDS = (
    "system\nYou are a helpful assistant.\nuser\nSQLite database:\nDatabase Engine:\nSQLite\n\nDatabase Schema:\n"
    "These statements give each table's columns with their types, its primary key and its foreign keys; a comment "
    "after a column shows some of its values, for example: [1, 2].\n\nQuestion: \n\nInstructions:\n- Return exactly "
    "what the question asks for: if it asks for a specific column, select that column and no other.\n- Return all of "
    "the requested information, with nothing missing and nothing extra.\n- Work out step by step how to build the "
    "query before you write it.\n\nOutput Format:\nReason inside <think> </think> tags, then give the final SQLite "
    "query inside <answer> </answer> tags, as one code block that starts with ```sql and ends with ```.\n"
    "assistant\nI will write the SQL query that answers the question.\n"
)

# ---------------------------------------------------------------------------------------------- name pools
# One vocabulary for both splits: a held-out database is a new combination of it, with its own rows, as Spider's dev
# databases are new combinations of English words the model knows. Every entity noun pluralises with a plain "s".

ENTITIES = (
    "flight", "pilot", "airport", "airline", "singer", "concert", "album", "song", "student", "course", "teacher",
    "school", "book", "author", "movie", "director", "actor", "hotel", "guest", "shop", "product", "customer",
    "employee", "department", "ship", "port", "captain", "team", "player", "referee", "stadium", "museum",
    "painting", "artist", "farm", "crop", "car", "driver", "garage", "hospital", "doctor", "patient", "restaurant",
    "chef", "river", "mountain", "bank", "account", "club", "member", "park", "cake", "train", "station",
    "route", "camera", "phone", "store", "warehouse", "supplier", "journal", "article", "editor", "gym",
    "trainer", "bridge", "tower", "island", "lake", "village", "planet", "comet", "crater", "glacier", "castle",
    "knight", "dragon", "robot", "sensor", "reactor", "violinist", "theater", "vineyard", "lighthouse", "canyon",
    "rocket", "meteor", "nebula", "asteroid", "goblin", "temple", "pirate", "beacon",
)
NUMERIC = {
    "price": (5, 500), "distance": (100, 5000), "age": (18, 80), "rating": (1, 10), "salary": (20, 250),
    "capacity": (10, 900), "weight": (1, 300), "height": (100, 250), "length": (1, 900), "budget": (100, 9999),
    "population": (100, 9999), "score": (0, 100), "speed": (10, 400), "duration": (1, 300), "year": (1950, 2023),
    "quantity": (1, 500), "area": (10, 5000), "revenue": (100, 9999), "elevation": (0, 4000), "depth": (1, 900),
    "stock": (0, 999), "points": (0, 99), "fee": (5, 999), "floors": (1, 90), "seats": (2, 400),
    "pages": (50, 1200), "cost": (1, 999), "mileage": (0, 9999), "calories": (50, 1500), "visitors": (10, 9999),
    "radius": (1, 999), "temperature": (0, 500), "velocity": (1, 999), "density": (1, 99), "gravity": (1, 50),
    "latency": (1, 900), "charge": (1, 480), "energy": (10, 9999), "wattage": (5, 2000), "humidity": (0, 100),
    "stamina": (1, 200), "agility": (1, 99), "durability": (1, 999), "radiation": (0, 999),
}
CATEGORICAL = {
    "city": ("Paris", "Berlin", "Tokyo", "Lima", "Cairo", "Oslo"),
    "country": ("France", "Japan", "Brazil", "Canada", "Kenya", "India"),
    "color": ("red", "blue", "green", "black", "white"),
    "category": ("basic", "premium", "standard", "deluxe"),
    "genre": ("rock", "jazz", "pop", "folk", "blues"),
    "status": ("active", "closed", "pending", "retired"),
    "region": ("north", "south", "east", "west"),
    "brand": ("Acme", "Zenith", "Orion", "Nova"),
    "language": ("English", "Spanish", "German", "Hindi", "Arabic"),
    "material": ("wood", "steel", "glass", "stone", "plastic"),
    "season": ("spring", "summer", "autumn", "winter"),
    "style": ("modern", "classic", "rustic", "minimal"),
    "shift": ("day", "night", "evening"),
    "size": ("small", "medium", "large"),
    "cuisine": ("Italian", "Thai", "Mexican", "Greek"),
    "grade": ("junior", "senior", "expert", "novice"),
    "element": ("water", "earth", "air", "storm"),
    "faction": ("alpha", "beta", "gamma", "delta"),
    "clan": ("amber", "azure", "violet", "golden"),
    "mood": ("calm", "gloomy", "bored", "proud"),
    "tier": ("bronze", "copper", "gold", "platinum"),
    "biome": ("desert", "jungle", "frozen", "scorched"),
    "sector": ("inner", "upper", "central"),
    "flavor": ("sour", "salty", "spicy"),
}
LABELS = ("name", "title", "nickname", "alias", "moniker", "codename", "epithet", "handle")
# Label values (unique per table; held-out ones never occur in train) are pseudo-words from this syllable inventory.
SYLLABLES = (
    "ka", "lo", "mi", "ren", "tu", "vo", "sa", "bel", "dor", "fi", "ga", "hu", "ix", "jo", "ne", "pra", "qui", "ro",
    "sel", "ta", "ul", "ven", "wy", "za", "mar", "tel", "nor", "shi", "bo", "le",
)


def plural(noun: str) -> str:
    """Every entity noun pluralises with a plain "s" (the pool is chosen so), which TOY_SPLIT cuts off again."""
    return noun + "s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------- databases


@dataclass
class Table:
    name: str
    label: str  # unique text column (name, title, ...)
    numeric: list[str]
    category: str
    parent: str | None  # table referenced by the foreign key column <parent>_id
    columns: list[str] = field(default_factory=list)  # in schema order
    rows: list[dict] = field(default_factory=list)

    @property
    def pk(self) -> str:
        return f"{self.name}_id"

    @property
    def plural(self) -> str:
        return plural(self.name)


@dataclass
class Database:
    db_id: str
    tables: list[Table]

    def table(self, name: str) -> Table:
        return next(t for t in self.tables if t.name == name)


def pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


class Deck:
    """Draws words without replacement, reshuffling a pool once it runs out: the train split uses every word."""

    def __init__(self, rng: random.Random):
        self.rng, self.left = rng, {}

    def sample(self, pool, k: int) -> list:
        left = self.left.setdefault(id(pool), [])
        if len(left) < k:
            fresh = sorted(pool)
            self.rng.shuffle(fresh)
            left[:0] = [w for w in fresh if w not in left]  # drawn from the end: old leftovers first
        return [left.pop() for _ in range(k)]


def make_database(rng: random.Random, draw=None, taken_labels: set[str] = frozenset(),
                  taken_tables: set[frozenset] = frozenset()) -> Database:
    """2-3 tables with distinct column names; tables[1] (and tables[2] half the time) reference tables[0].

    Words come from `draw(pool, k)` (the train split's Deck; default rng.sample). The db_id names the first two
    tables, Spider style (e.g. "album_song"). A held-out database avoids the train split's sets of tables
    (`taken_tables`) and label values (`taken_labels`), so its schema and its rows are new.
    """
    draw = draw or (lambda pool, k: rng.sample(sorted(pool), k))
    n_tables = rng.randint(2, 3)
    names = draw(ENTITIES, n_tables)
    while frozenset(names) in taken_tables:
        names = draw(ENTITIES, n_tables)
    numeric = draw(NUMERIC, 2 * n_tables)
    categories = draw(CATEGORICAL, n_tables)
    labels = draw(LABELS, n_tables)
    tables = []
    for i, name in enumerate(names):
        parent = None if i == 0 or (i == 2 and rng.random() < 0.5) else names[0]
        nums = numeric[2 * i : 2 * i + rng.randint(1, 2)]
        t = Table(name, labels[i], nums, categories[i], parent)
        attrs = [*nums, t.category]
        rng.shuffle(attrs)
        t.columns = [t.pk, t.label, *attrs] + ([f"{parent}_id"] if parent else [])
        tables.append(t)
    for t in tables:
        n_rows = rng.randint(40, 100) if t.parent is None else rng.randint(80, 160)
        used: set[str] = set()
        values = rng.sample(CATEGORICAL[t.category], rng.randint(3, len(CATEGORICAL[t.category])))
        weights = [rng.random() + 0.2 for _ in values]
        parent_rows = len(tables[0].rows)
        for r in range(n_rows):
            label = pseudo_word(rng)
            while label in used or label in taken_labels:
                label = pseudo_word(rng)
            used.add(label)
            row = {t.pk: r + 1, t.label: label, t.category: rng.choices(values, weights)[0]}
            for col in t.numeric:
                row[col] = rng.randint(*NUMERIC[col])
            if t.parent:
                row[f"{t.parent}_id"] = rng.randint(1, parent_rows)
            t.rows.append(row)
    return Database("_".join(names[:2]), tables)


def create_statement(t: Table) -> str:
    """CREATE TABLE laid out as data.py's schema text renders it (columns, then primary and foreign keys)."""
    lines = [f"  {col} {'TEXT' if col in (t.label, t.category) else 'INTEGER'}," for col in t.columns]
    lines.append(f"  PRIMARY KEY ({t.pk})" + ("," if t.parent else ""))
    if t.parent:
        lines.append(f"  FOREIGN KEY ({t.parent}_id) REFERENCES {t.parent} ({t.parent}_id)")
    return f"CREATE TABLE {t.name} (\n" + "\n".join(lines) + "\n);"


def write_sqlite(db: Database, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    with conn:
        for t in db.tables:
            conn.execute(create_statement(t))
            marks = ", ".join("?" for _ in t.columns)
            conn.executemany(f"INSERT INTO {t.name} VALUES ({marks})", [[r[c] for c in t.columns] for r in t.rows])
    conn.close()


def spider_schema(db: Database) -> dict:
    """The tables.json record: column 0 is '*', columns are [table_index, name], keys are column indices."""
    cols, types, index = [[-1, "*"]], ["text"], {}
    for ti, t in enumerate(db.tables):
        for col in t.columns:
            index[(t.name, col)] = len(cols)
            cols.append([ti, col])
            types.append("text" if col in (t.label, t.category) else "number")
    fks = [[index[(t.name, f"{t.parent}_id")], index[(t.parent, f"{t.parent}_id")]] for t in db.tables if t.parent]
    return {
        "db_id": db.db_id,
        "table_names_original": [t.name for t in db.tables],
        "table_names": [t.name.replace("_", " ") for t in db.tables],
        "column_names_original": cols,
        "column_names": [[ti, name.replace("_", " ").lower()] for ti, name in cols],
        "column_types": types,
        "primary_keys": [index[(t.name, t.pk)] for t in db.tables],
        "foreign_keys": fks,
    }


# ---------------------------------------------------------------------------------------------- questions
# A template returns (question, query, cot) or None when this database offers no instance of it.

OPS = {">": ("greater than", "more than", "above"), "<": ("less than", "below", "under")}
AGGS = {"MAX": ("maximum", "highest"), "MIN": ("minimum", "lowest"), "AVG": ("average", "mean"), "SUM": ("total",)}


def middle_value(values: list[int], rng: random.Random) -> int:
    """A threshold from the middle half of the distinct values: both sides of it are non-empty."""
    distinct = sorted(set(values))
    lo, hi = len(distinct) // 4, max(len(distinct) // 4, 3 * len(distinct) // 4 - 1)
    return distinct[rng.randint(lo, hi)]


def q_count_all(db, rng):
    t = rng.choice(db.tables)
    q = rng.choice(("How many {p} are there?", "Count the number of {p}.", "What is the total number of {p}?"))
    return q.format(p=t.plural), f"SELECT COUNT(*) FROM {t.name}", f"Count the rows of {t.name}."


def q_count_where(db, rng):
    t = rng.choice(db.tables)
    col, op = rng.choice(t.numeric), rng.choice("><")
    v = middle_value([r[col] for r in t.rows], rng)
    q = f"How many {t.plural} have {article(col)} {col} {rng.choice(OPS[op])} {v}?"
    return q, f"SELECT COUNT(*) FROM {t.name} WHERE {col} {op} {v}", f"Count {t.name} rows with {col} {op} {v}."


def q_select_where_category(db, rng):
    t = rng.choice(db.tables)
    v = rng.choice([r[t.category] for r in t.rows])
    q = rng.choice(("List the {l} of {p} whose {c} is '{v}'.", "Which {p} have {c} '{v}'? Give their {l}."))
    sql = f"SELECT {t.label} FROM {t.name} WHERE {t.category} = '{v}'"
    return q.format(l=t.label, p=t.plural, c=t.category, v=v), sql, f"Filter {t.name} on {t.category}, return {t.label}."


def q_aggregate(db, rng):
    t = rng.choice(db.tables)
    col, fn = rng.choice(t.numeric), rng.choice(sorted(AGGS))
    q = rng.choice(("What is the {a} {c} of all {p}?", "Find the {a} {c} among {p}."))
    sql = f"SELECT {fn}({col}) FROM {t.name}"
    return q.format(a=rng.choice(AGGS[fn]), c=col, p=t.plural), sql, f"Take {fn} of {col} in {t.name}."


def q_lookup(db, rng):
    t = rng.choice(db.tables)
    col, row = rng.choice(t.numeric), rng.choice(t.rows)
    q = rng.choice(("What is the {c} of the {e} whose {l} is '{v}'?", "Find the {c} of the {e} with {l} '{v}'."))
    sql = f"SELECT {col} FROM {t.name} WHERE {t.label} = '{row[t.label]}'"
    return q.format(c=col, e=t.name, l=t.label, v=row[t.label]), sql, f"Find the {t.name} by {t.label}, return {col}."


def q_select_where_number(db, rng):
    t = rng.choice(db.tables)
    col, op = rng.choice(t.numeric), rng.choice("><")
    v = middle_value([r[col] for r in t.rows], rng)
    q = f"Show the {t.label} and {col} of {t.plural} with {col} {rng.choice(OPS[op])} {v}."
    sql = f"SELECT {t.label}, {col} FROM {t.name} WHERE {col} {op} {v}"
    return q, sql, f"Filter {t.name} on {col}, return {t.label} and {col}."


def q_group_count(db, rng):
    t = rng.choice(db.tables)
    q = rng.choice(("How many {p} are there for each {c}?", "Count the {p} in each {c}."))
    sql = f"SELECT {t.category}, COUNT(*) FROM {t.name} GROUP BY {t.category}"
    return q.format(p=t.plural, c=t.category), sql, f"Group {t.name} by {t.category}, count rows."


def q_top_k(db, rng):
    t = rng.choice(db.tables)
    col, k, top = rng.choice(t.numeric), rng.choice((1, 3, 5)), rng.random() < 0.5
    ranked = sorted((r[col] for r in t.rows), reverse=top)
    if ranked[k - 1] == ranked[k]:  # a tie at the cut: the answer would depend on row order
        return None
    word = "highest" if top else "lowest"
    if k == 1:
        q = f"Which {t.name} has the {word} {col}? Give its {t.label}."
    else:
        q = f"Give the {t.label} of the {k} {t.plural} with the {word} {col}."
    order = "DESC" if top else "ASC"
    sql = f"SELECT {t.label} FROM {t.name} ORDER BY {col} {order} LIMIT {k}"
    return q, sql, f"Sort {t.name} by {col} {order}, take {k}, return {t.label}."


def q_aggregate_where(db, rng):
    t = rng.choice(db.tables)
    col, fn = rng.choice(t.numeric), rng.choice(sorted(AGGS))
    v = rng.choice([r[t.category] for r in t.rows])
    q = f"What is the {rng.choice(AGGS[fn])} {col} of {t.plural} whose {t.category} is '{v}'?"
    sql = f"SELECT {fn}({col}) FROM {t.name} WHERE {t.category} = '{v}'"
    return q, sql, f"Filter {t.name} on {t.category}, take {fn} of {col}."


def q_having(db, rng):
    t = rng.choice(db.tables)
    sizes = sorted({sum(r[t.category] == v for r in t.rows) for v in {r[t.category] for r in t.rows}})
    if len(sizes) < 2:
        return None
    k = rng.randint(sizes[0], sizes[-1] - 1)  # at least one group qualifies, at least one does not
    q = rng.choice(("Which {c} values have more than {k} {p}?", "List each {c} with more than {k} {p}."))
    sql = f"SELECT {t.category} FROM {t.name} GROUP BY {t.category} HAVING COUNT(*) > {k}"
    return q.format(c=t.category, k=k, p=t.plural), sql, f"Group {t.name} by {t.category}, keep counts above {k}."


def join_clause(child: Table) -> str:
    key = f"{child.parent}_id"
    return f"{child.name} AS T1 JOIN {child.parent} AS T2 ON T1.{key} = T2.{key}"


def q_join_where(db, rng):
    child = rng.choice([t for t in db.tables if t.parent])
    parent = db.table(child.parent)
    if rng.random() < 0.5:
        v = rng.choice([r[parent.category] for r in parent.rows])
        q = f"List the {child.label} of {child.plural} whose {parent.name} has {parent.category} '{v}'."
        col, cond = parent.category, f"T2.{parent.category} = '{v}'"
    else:
        col, op = rng.choice(parent.numeric), rng.choice("><")
        v = middle_value([r[col] for r in parent.rows], rng)
        q = f"List the {child.label} of {child.plural} whose {parent.name} has {article(col)} {col} {rng.choice(OPS[op])} {v}."
        cond = f"T2.{col} {op} {v}"
    sql = f"SELECT T1.{child.label} FROM {join_clause(child)} WHERE {cond}"
    return q, sql, f"Join {child.name} with {parent.name}, filter on {col}, return {child.label}."


def q_join_count(db, rng):
    child = rng.choice([t for t in db.tables if t.parent])
    parent = db.table(child.parent)
    v = rng.choice(parent.rows)[parent.label]
    q = f"How many {child.plural} belong to the {parent.name} whose {parent.label} is '{v}'?"
    sql = f"SELECT COUNT(*) FROM {join_clause(child)} WHERE T2.{parent.label} = '{v}'"
    return q, sql, f"Join {child.name} with {parent.name}, count rows for that {parent.label}."


def q_above_average(db, rng):
    t = rng.choice(db.tables)
    col = rng.choice(t.numeric)
    q = rng.choice((
        "List the {l} of {p} whose {c} is above the average.",
        "Which {p} have {a} {c} higher than the average {c}? Give their {l}.",
    ))
    sql = f"SELECT {t.label} FROM {t.name} WHERE {col} > (SELECT AVG({col}) FROM {t.name})"
    cot = f"Compare {col} with its average in {t.name}, return {t.label}."
    return q.format(l=t.label, p=t.plural, c=col, a=article(col)), sql, cot


# (template, difficulty, weight): every database gets questions in these proportions, so dev's mix equals train's.
TEMPLATES = (
    (q_count_all, "easy", 1),
    (q_count_where, "easy", 2),
    (q_select_where_category, "easy", 2),
    (q_aggregate, "easy", 2),
    (q_lookup, "easy", 2),
    (q_select_where_number, "medium", 1),
    (q_group_count, "medium", 1),
    (q_top_k, "medium", 2),
    (q_aggregate_where, "medium", 1),
    (q_having, "hard", 1),
    (q_join_where, "hard", 2),
    (q_join_count, "hard", 1),
    (q_above_average, "hard", 1),
)
PLAN_SIZE = sum(w for _, _, w in TEMPLATES)


# The cold-start teacher. sft.json holds the train questions again, answered by an imperfect teacher: the stand-in
# for SQL-R1's SynSQL traces, which LLMs wrote and nobody verified. It writes the gold trace and SQL except that,
# with probability TEACHER_SLIP each, it makes three habitual mistakes: selecting every column instead of the one
# asked for, reading "lowest" / "below" / "minimum" as the other end, and summing where an average is asked. SFT
# imitates the slips; GRPO, paid for matching the gold result, can unlearn them. That is the gap between imitating
# traces and optimising execution which SQL-R1's RL stage closes, here made large enough to see on a laptop.
TEACHER_SLIP = 0.7
STAR = re.compile(r"^SELECT ((?:T1\.)?)\w+ FROM")  # a single selected column
HABITS = ((" < ", " > "), (" ASC ", " DESC "), ("MIN(", "MAX("), ("AVG(", "SUM("))  # (gold, the teacher's slip)


def could_slip(query: str) -> bool:
    """Whether the teacher could make one of its habitual mistakes on this gold SQL."""
    return bool(STAR.match(query)) or any(gold in query for gold, _ in HABITS)


def teacher_answer(record: dict, rng: random.Random, slip: float = TEACHER_SLIP) -> dict:
    """The record with the teacher's trace and SQL: the gold ones, each habitual mistake made with probability slip."""
    query, cot = record["query"], record["cot"]
    if STAR.match(query) and rng.random() < slip:
        query = STAR.sub(r"SELECT \1* FROM", query)
        cot = re.sub(r"return \w+\.$", "return every column.", cot)
    for gold, wrong in HABITS:
        if gold in query and rng.random() < slip:
            query = query.replace(gold, wrong)
            cot = cot.replace(gold.strip(" ("), wrong.strip(" ("))
    return {**record, "query": query, "cot": cot}


# sft_noisy.json's extra habit. The questions name tables in the plural ("How many flights are there?") and the
# tokenizer spells " flights" as " flight" + "s", so writing "FROM flights" is the tiny model's most natural
# mistake, and an error, not a wrong result: S_e = -2. In sft.json every slip still runs, so nearly every GRPO group
# executes throughout, and there SQL-R1's S_r is redundant under group-std advantages: S_l, paid only when the result
# is correct, orders the group the same way (wrong 3 < right ~4 without S_r, 0 < ~7 with it; the same A_i after
# normalisation). Only groups that mix errors with wrong and right answers tell the two apart: without S_r a wrong
# answer that runs earns nearly what a right one does.
TEACHER_PLURAL = 0.4
TABLE_REF = re.compile(r"\b(FROM|JOIN) (\w+)")


def plural_tables(query: str) -> str:
    """The SQL with every table after FROM / JOIN named in the plural."""
    return TABLE_REF.sub(lambda m: f"{m[1]} {plural(m[2])}", query)


def teacher_plural_slip(record: dict, rng: random.Random, slip: float = TEACHER_PLURAL) -> dict:
    """The record with, with probability slip, every table of its SQL named in the plural (the trace unchanged)."""
    if rng.random() >= slip:
        return record
    return {**record, "query": plural_tables(record["query"])}


# sft_careful.json: the plural habit where it hurts the right idea only. The teacher writes it in its careful
# answers: where a habitual mistake was possible and it made none, it copies the question's table names with
# probability CAREFUL_PLURAL, while its habitual answers always run. Without S_r (w_r = 0) a wrong query that runs
# earns S_f + S_e = 3, a right one 3 + S_l ~ 3.8 and an error -1, so while the right idea still fails with
# probability p its expected reward is 3.8 (1 - p) - p, below the habit's 3 for p > 0.17: GRPO is paid to retreat
# to the habit; with S_r it is 6.8 (1 - p) - p against the habit's 0. (Under group-std advantages the retreat is
# temporary, S_l still ranks right above wrong; without the std division it holds: RESULTS.md, "RL lab".)
CAREFUL_PLURAL = 0.6


def teacher_careful_plural(gold: dict, taught: dict, rng: random.Random, slip: float = CAREFUL_PLURAL) -> dict:
    """The teacher's record `taught` for the train record `gold`: if a habitual mistake was possible and the teacher
    made none, then with probability slip every table of its SQL is named in the plural (the trace unchanged)."""
    if taught["query"] != gold["query"] or not could_slip(gold["query"]) or rng.random() >= slip:
        return taught
    return {**taught, "query": plural_tables(taught["query"])}


def q_lookup_partial(db, rng, conn):
    """The lookup family: a row named by the shortest lower-case prefix (>= 4 letters) of its label that no other
    row shares. Returns (question, gold SQL, lookup SQL, the lookup's observation body, column) or None."""
    t = rng.choice(db.tables)
    col, label = rng.choice(t.numeric), rng.choice(t.rows)[t.label]
    prefix = next((label[:n].lower() for n in range(4, len(label))
                   if sum(r[t.label].lower().startswith(label[:n].lower()) for r in t.rows) == 1), None)
    if prefix is None:
        return None
    q = rng.choice(("What is the {c} of the {e} whose {l} starts with '{v}'?", "Find the {c} of the {e} with a {l} "
                    "beginning with '{v}'."))
    lookup = f"SELECT {t.label} FROM {t.name} WHERE {t.label} LIKE '{prefix}%'"
    rows = conn.execute(lookup).fetchall()
    assert rows == [(label,)], (lookup, rows)
    gold = f"SELECT {col} FROM {t.name} WHERE {t.label} = '{label}'"
    return q.format(c=col, e=t.name, l=t.label, v=prefix), gold, lookup, render(ExecResult("ok", rows, 1, columns=[t.label]), 5), col


def lookup_records(root: Path, seed: int, split: str, dbs: list[Database], per_db: int) -> list[tuple[dict, dict, dict]]:
    """per_db lookup questions per database: (record, tool-using teacher record, one-turn teacher record) each."""
    out = []
    for db in dbs:
        rng = random.Random(f"toyworld-{seed}-tools-{split}-{db.db_id}")
        conn = sqlite3.connect(root / "database" / db.db_id / f"{db.db_id}.sqlite")
        seen = set()
        while len(seen) < per_db:
            made = q_lookup_partial(db, rng, conn)
            if made is None or made[0] in seen:
                continue
            question, gold, lookup, body, col = made
            seen.add(question)
            table = lookup.split(" FROM ")[1].split()[0]
            base = {"db_id": db.db_id, "question": question, "query": gold, "difficulty": "medium",
                    "cot": f"Look up the exact name in {table}, return {col}."}
            tools = {**base, "cot": f"Look up the exact name.\n<sql>{lookup}</sql>{OBS_OPEN}{body}{OBS_CLOSE}"
                                    f"Filter {table} on it, return {col}."}
            blind = {**base, "query": gold.split(" WHERE ")[0] + " WHERE " + lookup.split(" WHERE ")[1],
                     "cot": f"Match the name by its start in {table}, return {col}."}
            out.append((base, tools, blind))
        conn.close()
    return out


def informative(rows: list[tuple]) -> bool:
    """A gold result worth rewarding: some row, not only NULLs, not a bare zero count."""
    return bool(rows) and any(v is not None for row in rows for v in row) and rows != [(0,)]


def make_questions(db: Database, conn: sqlite3.Connection, n: int, rng: random.Random) -> list[dict]:
    """n questions following the template plan; a template is retried until it yields a new, informative one."""
    plan = [(fn, diff) for fn, diff, w in TEMPLATES for _ in range(w)] * (n // PLAN_SIZE + 1)
    plan = plan[:n] if n % PLAN_SIZE == 0 else rng.sample(plan, n)
    rng.shuffle(plan)
    seen, out = set(), []
    for fn, difficulty in plan:
        for _ in range(200):
            made = fn(db, rng)
            if made is None or made[0] in seen or not informative(conn.execute(made[1]).fetchall()):
                continue
            question, query, cot = made
            seen.add(question)
            out.append({"db_id": db.db_id, "question": question, "query": query, "cot": cot, "difficulty": difficulty})
            break
        else:
            raise RuntimeError(f"{db.db_id}: template {fn.__name__} produced no new informative question")
    return out


# ---------------------------------------------------------------------------------------------- tokenizer


def vocabulary_words() -> set[str]:
    """Every table, column and category word of the world (singular table names: a plural is singular + suffix)."""
    words = {*ENTITIES, *NUMERIC, *CATEGORICAL, *LABELS, "id"}
    return words | {v for values in CATEGORICAL.values() for v in values}


def byte_level_bpe() -> Tokenizer:
    """An empty BPE: the toy split regex, then bytes mapped to printable chars (as Qwen's)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TOY_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: list[str], words: set[str], vocab_size: int, repeat: int = 50) -> Tokenizer:
    """Byte-level BPE on `texts` plus every vocabulary word `repeat` times, spaced and bare.

    Each word then is one token in both spellings (" price" in text, "price" after "(" or "."), and as TOY_SPLIT cuts
    a plural's "s" off, " flights" is " flight" + "s": the name a question uses is the token the SQL needs. Label
    values (unique pseudo-words) and numbers stay spelled with syllable and digit pieces.
    """
    corpus = texts + [f" {w} ({w}" for w in sorted(words)] * repeat
    tok = byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in RESPONSE_TAGS])  # one token each (Qwen3)
    return tok


# ChatML with the default system turn, so transformers' apply_chat_template renders what sqlr1.tokenizer renders.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + SYSTEM_MESSAGE + "<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
        "sqlr1_default_system": SYSTEM_MESSAGE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- build


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def make_split(root: Path, seed: int, split: str, n_dbs: int, questions_per_db: int, used_ids: set[str], draw=None,
               taken_labels: set[str] = frozenset(), taken_tables: set[frozenset] = frozenset()):
    """n_dbs databases written under root/database (see make_database) and their questions: (databases, records)."""
    dbs, records = [], []
    for i in range(n_dbs):
        rng = random.Random(f"toyworld-{seed}-{split}-{i}")
        db = make_database(rng, draw, taken_labels, taken_tables)
        while db.db_id in used_ids:
            db.db_id += "_2"
        used_ids.add(db.db_id)
        path = root / "database" / db.db_id / f"{db.db_id}.sqlite"
        write_sqlite(db, path)
        conn = sqlite3.connect(path)
        records += make_questions(db, conn, questions_per_db, rng)
        conn.close()
        dbs.append(db)
    return dbs, records


def build_toyworld(
    root: str | Path,
    seed: int = 0,
    num_train_dbs: int = 120,
    num_dev_dbs: int = 7,
    train_questions_per_db: int = 19,
    dev_questions_per_db: int = 38,
    vocab_size: int = 2000,
) -> Path:
    """Write the whole world under `root` (which must not exist or be empty); deterministic given the arguments."""
    start = time.time()
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"build_toyworld: {root} is not empty; pick a new directory or use ensure_toyworld")
    if num_train_dbs < 1 or num_dev_dbs < 1:
        raise ValueError(f"num_train_dbs={num_train_dbs}, num_dev_dbs={num_dev_dbs}: need at least one of each")
    used_ids: set[str] = set()  # shared by both splits: a held-out db_id never lands in a train directory
    train_dbs, train = make_split(root, seed, "train", num_train_dbs, train_questions_per_db, used_ids,
                                  draw=Deck(random.Random(f"toyworld-{seed}-deck")).sample)
    # held-out databases avoid the train split's sets of tables and its label values
    dev_dbs, dev = make_split(root, seed, "dev", num_dev_dbs, dev_questions_per_db, used_ids,
                              taken_labels={r[t.label] for db in train_dbs for t in db.tables for r in t.rows},
                              taken_tables={frozenset(t.name for t in db.tables) for db in train_dbs})
    teacher = random.Random(f"toyworld-{seed}-teacher")
    sft = [teacher_answer(r, teacher) for r in train]
    for name, records in (("train", train), ("dev", dev), ("sft", sft)):
        write_json(root / f"{name}.json", records)
    write_json(root / "tables.json", [spider_schema(db) for db in train_dbs + dev_dbs])
    noisy = random.Random(f"toyworld-{seed}-teacher-plural")  # its own stream: sft.json does not depend on it
    write_json(root / "sft_noisy.json", [teacher_plural_slip(r, noisy) for r in sft])
    careful = random.Random(f"toyworld-{seed}-teacher-careful")
    write_json(root / "sft_careful.json", [teacher_careful_plural(g, t, careful) for g, t in zip(train, sft)])

    texts = [PROMPT_WORDS] * 100 + [create_statement(t) for db in train_dbs for t in db.tables]
    texts += [f"Question: {r['question']}\n\n{r['cot']}\n\n```sql\n{r['query']}\n```\n" for r in train + sft]
    tok = train_tokenizer(texts, vocabulary_words(), vocab_size)
    write_tokenizer(tok, root / "tokenizer")
    # the lookup family, after the tokenizer, which is trained without it
    train_lookups = lookup_records(root, seed, "train", train_dbs, 3)
    dev_lookups = lookup_records(root, seed, "dev", dev_dbs, 6)
    write_json(root / "train_tools.json", train + [b for b, _, _ in train_lookups])
    write_json(root / "dev_tools.json", dev + [b for b, _, _ in dev_lookups])
    write_json(root / "sft_tools.json", sft + [t for _, t, _ in train_lookups])
    write_json(root / "sft_tools_blind.json", sft + [x for _, _, x in train_lookups])

    settings = {
        "format_version": FORMAT_VERSION, "seed": seed, "num_train_dbs": num_train_dbs, "num_dev_dbs": num_dev_dbs,
        "train_questions_per_db": train_questions_per_db,
        "dev_questions_per_db": dev_questions_per_db, "vocab_size": vocab_size,
    }
    counts = {"train_questions": len(train), "dev_questions": len(dev),
              "tokenizer_size": tok.get_vocab_size(with_added_tokens=True)}
    write_json(root / MANIFEST, {**settings, **counts})
    print(
        f"toyworld: {num_train_dbs} train + {num_dev_dbs} dev databases, {counts['train_questions']} train + "
        f"{counts['dev_questions']} dev questions, vocab {counts['tokenizer_size']}, {time.time() - start:.1f}s"
    )
    return root


def read_manifest(root: Path) -> dict | None:
    """The world's toyworld.json (None when absent), or a ValueError naming the file."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
        problem = "" if isinstance(found, dict) else f"a JSON {type(found).__name__}, not an object"
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"not valid JSON: {e}"
    if problem:
        raise ValueError(f"{path}: damaged toy world manifest ({problem}); delete the folder {root} to rebuild the "
                         "world (move out anything of yours first), or pick another data_root")
    return found


def ensure_toyworld(root: str | Path, seed: int = 0) -> Path:
    """Build the default world at `root` unless its manifest already says so (same format version and seed).

    Built in a temporary sibling directory and renamed into place, so an interrupted build leaves nothing half-made
    (the temporary directory is removed, Ctrl-C included). An outdated world is replaced only if it holds nothing
    but what build_toyworld wrote (GENERATED); anything else in it (a model, the user's files) is named in an error
    and never deleted.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"ensure_toyworld: {root} is a file, not a toy world folder: pick another data_root")
    found = read_manifest(root)
    models: list[str] = []  # model_seed<N>/ next to an outdated world: carried over if the tokenizer is unchanged
    if found is not None:
        if found.get("format_version") == FORMAT_VERSION and found.get("seed") == seed:
            return root
        extra = sorted(p.name for p in root.iterdir() if p.name not in GENERATED)
        models = [name for name in extra if re.fullmatch(r"model_seed\d+", name)]
        extra = [name for name in extra if name not in models]
        if extra:
            built = f"format {found.get('format_version')}, seed {found.get('seed')}"
            raise FileExistsError(
                f"ensure_toyworld: {root} is a toy world of another build ({built}; wanted format {FORMAT_VERSION}, "
                f"seed {seed}) and rebuilding it would delete {', '.join(extra)}: move those out of {root}, or pick "
                "another data_root")
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(f"ensure_toyworld: {root} is not empty and holds no {MANIFEST}; it is not a toy world "
                              "(refusing to replace it): pick another data_root")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_toyworld(tmp, seed=seed)
        if models and not _same_files(root / "tokenizer", tmp / "tokenizer"):
            raise FileExistsError(
                f"ensure_toyworld: {root} holds {', '.join(models)}, made with the old world's tokenizer, which the "
                f"rebuild (format {FORMAT_VERSION}, seed {seed}) changes: move them out of {root} (train.py makes a "
                "fresh one when it is missing), or pick another data_root")
        for name in models:  # same tokenizer: the models still match the new world
            (root / name).rename(tmp / name)
    except BaseException:  # Ctrl-C or an error: no half-built world left behind
        for name in models:
            if (tmp / name).exists():
                (tmp / name).rename(root / name)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if root.exists():
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        root.rename(old)
        shutil.rmtree(old)
    tmp.rename(root)
    return root


def _same_files(a: Path, b: Path) -> bool:
    """Two directories hold the same file names with the same bytes."""
    names = sorted(p.name for p in a.iterdir()) if a.is_dir() else None
    return names == (sorted(p.name for p in b.iterdir()) if b.is_dir() else None) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names or [])


# ---------------------------------------------------------------------------------------------- model


def tiny_config(tokenizer_size: int) -> ModelConfig:
    """4 layers, hidden 128, 4 query / 2 KV heads, tied embeddings; vocab padded to the next multiple of 64."""
    return ModelConfig(
        vocab_size=(tokenizer_size // 64 + 1) * 64,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
    )


def init_model(out_dir: str | Path, tokenizer_dir: str | Path, config: ModelConfig | None = None, seed: int = 0) -> Path:
    """A freshly initialised tiny Qwen2 saved in Hugging Face layout (config, safetensors, tokenizer files,
    generation_config.json)."""
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"init_model: no tokenizer.json in {tokenizer_dir}; build the world first (ensure_toyworld)")
    tokenizer = load_tokenizer(tokenizer_dir)
    config = config or tiny_config(tokenizer.vocab_size)
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"init_model: config.vocab_size={config.vocab_size} is below the tokenizer's {tokenizer.vocab_size} ids "
            f"({tokenizer_dir}); use at least that many embedding rows"
        )
    model = Qwen2(config)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return save_model(model, out_dir, tokenizer=tokenizer)  # generation_config.json: the tokenizer's stop and pad ids


def resolve_config(cfg):
    """dataset="toy": the run config with the toy world's paths, read like Spider (nothing is built here). Only the
    default model (model="": <world>/model_seed<seed>, the run's seed drawing the initial weights) may be created; a
    named model must exist (a local directory, or a Hub repo id)."""
    from dataclasses import replace

    from sqlr1.hub import resolve_checkpoint

    root = Path(cfg.data_root or "toyworld")
    if cfg.model:
        try:
            resolve_checkpoint(cfg.model)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--model={cfg.model}: {e}; leave model empty to train the toy world's fresh "
                                    f"model ({root / f'model_seed{cfg.seed}'})") from None
    return replace(cfg, dataset="spider", data_root=str(root), model=cfg.model or str(root / f"model_seed{cfg.seed}"))


def prepare(cfg) -> None:
    """Build the toy world at cfg.data_root, and its default tiny model, if missing (cfg from `resolve_config`)."""
    root = ensure_toyworld(cfg.data_root, seed=0)
    if cfg.model == str(root / f"model_seed{cfg.seed}") and not (Path(cfg.model) / "config.json").exists():
        init_model(cfg.model, root / "tokenizer", seed=cfg.seed)
