"""Examples, schema text and prompts: everything between a data set on disk and the prompt token ids.

    load_spider / load_bird / load_synsql   json records + SQLite files  ->  list[Example]
    schema_text / fit_schema                SQLite file  ->  CREATE TABLE text (optionally with example values)
    build_prompt                            Example  ->  ChatML prompt whose assistant turn starts with "<think>\\n"
    sft_response                            Example  ->  the cold-start SFT target after that "<think>\\n"
    filter_for_rl                           drops examples GRPO cannot learn from (prompt too long, bad gold)

SQL-R1 (Ma et al. 2025) trains and evaluates with one prompt: OmniSQL's (Li et al. 2025) task description, the
database schema as CREATE TABLE statements, the question with its external knowledge (BIRD's "evidence"), and an
output contract asking for reasoning in <think> </think> and the final SQL in a ```sql block inside
<answer> </answer>. The same prompt serves inference: the policy was trained to answer exactly this, and
self-consistency only samples it several times. `SQLR1_PROMPT` is our wording of it, `SHORT_PROMPT` a compact one
for the toy world, where every prompt token costs CPU time.

Data sets: Spider (Yu et al. 2018) and BIRD (Li et al. 2023), both CC BY-SA 4.0; SynSQL-2.5M (OmniSQL).
Databases are only read, through read-only `file:...?mode=ro` connections.
"""

from __future__ import annotations

import functools
import json
import re
import sqlite3
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sqlr1.reward import RESPONSE_TAGS
from sqlr1.sandbox import Sandbox, committed_read_problem, read_only_uri
from sqlr1.tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------- prompts

SQLR1_PROMPT = """Task Overview:
You are a data science expert. You are given the schema of a database and a question in natural language. \
Study the schema, then write one valid SQL query that answers the question.

Database Engine:
SQLite

Database Schema:
{schema}
These statements give each table's columns with their types, its primary key and its foreign keys; \
comments after columns, where present, show some of their values.

{external_knowledge}Question:
{question}

Instructions:
- Return exactly what the question asks for: if it asks for a specific column, select that column and no other.
- Return all of the requested information, with nothing missing and nothing extra.
- Work out step by step how to build the query before you write it.

Output Format:
Write your reasoning inside <think> </think> tags. Then write the final SQLite query inside <answer> </answer> \
tags, as a code block that starts with ```sql and ends with ```, for example:
<think>
step-by-step reasoning
</think>
<answer>
```sql
SELECT ...
```
</answer>"""

SHORT_PROMPT = """SQLite database:
{schema}

{external_knowledge}Question: {question}

Reason inside <think> </think>, then give one SQLite query in a ```sql block inside <answer> </answer>."""

PROMPT_TEMPLATES = {"sqlr1": SQLR1_PROMPT, "short": SHORT_PROMPT}  # TrainConfig.prompt_template, sample.py --template

# Inserted as {external_knowledge} when the example has evidence (BIRD, SynSQL); empty otherwise.
EVIDENCE_SECTION = """External Knowledge:
{evidence}

"""

# The assistant turn is pre-filled with this, so every completion starts inside the reasoning block.
THINK_PREFIX = "<think>\n"

# The reasoning of an SFT target when the example has none (Spider, BIRD): the "SQL only" cold start, which keeps
# the answer format but teaches no reasoning (SQL-R1 compares it with cold starts on reasoning traces).
SQL_ONLY_THINK = "I will write the SQL query that answers the question."


SAMPLE_SCAN_ROWS = 10_000  # example values come from the first rows of a table, so huge tables cost the same
MAX_VALUE_CHARS = 40  # example strings are cut to this length (as OmniSQL's prompts do)

# ---------------------------------------------------------------------------------------------------- examples


@dataclass
class Example:
    """One question about one database, with its gold SQL.

    `reasoning` is a reasoning trace for the SFT cold start (SynSQL's `cot`, the toy world's `cot`);
    `evidence` is BIRD's / SynSQL's external knowledge; `difficulty` is the data set's label (BIRD's
    simple/moderate/challenging, SynSQL's `sql_complexity`, the toy world's level).
    """

    question: str
    db_id: str
    db_path: Path
    sql: str
    evidence: str = ""
    reasoning: str | None = None
    difficulty: str | None = None


def load_spider(root: str | Path, split: str = "dev", skip_missing: bool = True,
                require_db: bool = True) -> list[Example]:
    """Spider layout: `root/{split}.json` (train: `train.json`, else `train_spider.json`), gold SQL in `query`,
    databases at `root/database/<db_id>/<db_id>.sqlite` (split "test": `root/test_database/` first).

    Optional `cot` and `difficulty` fields (written by our toy world) become `reasoning` and `difficulty`.
    Missing databases: see `require_db` and `skip_missing` in `load_dataset`.
    """
    root = Path(root)
    names = ["train.json", "train_spider.json"] if split == "train" else [f"{split}.json"]
    path = _first_file(root, names, "Spider")
    db_dirs = [root / "test_database", root / "database"] if split == "test" else [root / "database"]
    return _examples(path, _read_records(path), db_dirs, skip_missing, require_db,
                     sql="query", reasoning="cot", difficulty="difficulty")


def load_bird(root: str | Path, split: str = "dev", skip_missing: bool = True,
              require_db: bool = True) -> list[Example]:
    """BIRD layout: `root/dev.json` (falling back to the mini-dev's `mini_dev_sqlite.json`; split "mini_dev" reads
    it directly) or `root/train.json`; fields question, evidence, SQL, difficulty, db_id; databases at
    `root/{dev,train}_databases/<db_id>/<db_id>.sqlite`, else `root/databases/...`.
    """
    root = Path(root)
    if split == "dev":
        names = ["dev.json", "mini_dev_sqlite.json"]
    elif split == "mini_dev":
        names = ["mini_dev_sqlite.json"]
    else:
        names = [f"{split}.json"]
    path = _first_file(root, names, "BIRD")
    db_dirs = [root / ("train_databases" if split == "train" else "dev_databases"), root / "databases"]
    return _examples(path, _read_records(path), db_dirs, skip_missing, require_db,
                     sql="SQL", evidence="evidence", difficulty="difficulty")


def load_synsql(path: str | Path, db_root: str | Path, skip_missing: bool = True,
                require_db: bool = True) -> list[Example]:
    """SynSQL-2.5M records (OmniSQL): `data.json` (a JSON list), `.jsonl` or `.parquet` (needs pyarrow), fields
    db_id, question, external_knowledge, sql, cot, sql_complexity; databases at `db_root/<db_id>/<db_id>.sqlite`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SynSQL file {path} not found: pass the data.json / .jsonl / .parquet file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or convert it to .jsonl)") from None
        records = pyarrow.parquet.read_table(path).to_pylist()
    else:
        records = _read_records(path)
    return _examples(path, records, [Path(db_root)], skip_missing, require_db, sql="sql",
                     evidence="external_knowledge", reasoning="cot", difficulty="sql_complexity")


def load_dataset(name: str, root: str | Path, split: str, skip_missing: bool = True,
                 require_db: bool = True) -> list[Example]:
    """Load split `split` of data set `name` ("spider" | "bird" | "synsql") stored under `root`.

    SynSQL: `root/{split}.json|.jsonl|.parquet`, else `root/data.json`, with databases in `root/databases/`.
    An example whose database file is missing is skipped (one warning with the count and the first paths) when
    `skip_missing`, else FileNotFoundError names its path; `require_db=False` keeps every example without looking
    for its database (to read questions and gold SQL, e.g. BIRD's mini-dev before its databases are downloaded).
    """
    if name == "spider":
        return load_spider(root, split, skip_missing, require_db)
    if name == "bird":
        return load_bird(root, split, skip_missing, require_db)
    if name == "synsql":
        root = Path(root)
        path = _first_file(root, [f"{split}.json", f"{split}.jsonl", f"{split}.parquet", "data.json"], "SynSQL")
        return load_synsql(path, root / "databases", skip_missing, require_db)
    raise ValueError(f"unknown data set {name!r}: use 'spider', 'bird' or 'synsql'")


def _first_file(root: Path, names: list[str], what: str) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"no {what} file {' or '.join(names)} in {root}: check the data root and split")


def _read_records(path: Path) -> list:
    """A JSON list of records, or one JSON record per line for `.jsonl`."""
    try:
        return _parse_records(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); re-encode the file as UTF-8") from None


def _parse_records(path: Path) -> list:
    if path.suffix == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {line_no} is not valid JSON ({e.msg})") from None
        return records
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, found a {type(records).__name__}")
    return records


def _text(path: Path, index: int, record, name: str | None, required: bool) -> str | None:
    """Field `name` of record `index` as a string; error naming file, record and field when required but absent."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}: record {index} is not a JSON object")
    value = record.get(name) if name else None
    if value is None:
        if required:
            raise ValueError(f"{path}: record {index} has no field {name!r}")
        return None
    if not isinstance(value, str):
        raise ValueError(f"{path}: record {index}: field {name!r} must be a string, not {type(value).__name__}")
    return value


def _examples(path: Path, records: list, db_dirs: list[Path], skip_missing: bool, require_db: bool, *, sql: str,
              evidence: str | None = None, reasoning: str | None = None,
              difficulty: str | None = None) -> list[Example]:
    """Records -> Examples; `sql`, `evidence`, ... name the record fields that hold those Example fields."""
    examples, missing, undecodable = [], [], []
    db_paths: dict[str, Path] = {}
    for i, record in enumerate(records):
        db_id = _text(path, i, record, "db_id", True)
        if db_id in ("", ".", "..") or "/" in db_id or "\\" in db_id:
            raise ValueError(f"{path}: record {i}: db_id {db_id!r} is not a plain database name")
        if db_id not in db_paths:
            candidates = [d / db_id / f"{db_id}.sqlite" for d in db_dirs]
            db_paths[db_id] = next((p for p in candidates if p.is_file()), candidates[0])
        ex = Example(question=_text(path, i, record, "question", True), db_id=db_id, db_path=db_paths[db_id],
                     sql=_text(path, i, record, sql, True), evidence=_text(path, i, record, evidence, False) or "",
                     reasoning=_text(path, i, record, reasoning, False),
                     difficulty=_text(path, i, record, difficulty, False))
        bad_field = _lone_surrogate_field(ex)
        if bad_field is not None:  # the tokenizer cannot encode it; one such record must not stop a whole data set
            undecodable.append(f"record {i} ({bad_field})")
            continue
        if require_db and not ex.db_path.is_file():
            if not skip_missing:
                raise FileNotFoundError(f"{path}: record {i}: database {ex.db_path} not found (db_id {db_id!r}); "
                                        "download the databases or pass skip_missing=True")
            missing.append(ex.db_path)
            continue
        examples.append(ex)
    first = list(dict.fromkeys(map(str, missing)))[:3]
    if not examples:
        if missing:
            because = f"the databases of all are missing, e.g. {', '.join(first)}"
        else:
            because = "their text is not valid Unicode" if undecodable else "it is empty"
        raise ValueError(f"{path}: no usable examples in {len(records)} records: {because}")
    if missing:
        warnings.warn(f"{path}: skipped {len(missing)} of {len(records)} examples whose database is missing, "
                      f"e.g. {', '.join(first)}", stacklevel=3)
    if undecodable:
        warnings.warn(f"{path}: skipped {len(undecodable)} of {len(records)} examples whose text is not valid Unicode "
                      f"(a lone surrogate such as '\\udcff', left by a badly decoded file), e.g. "
                      f"{', '.join(undecodable[:3])}; fix the file's encoding to keep them", stacklevel=3)
    return examples


def _lone_surrogate_field(example: Example) -> str | None:
    """The first text field of `example` that cannot be encoded as UTF-8 (it holds a lone surrogate, e.g. '\\udcff'
    from bytes decoded with errors="surrogateescape"), or None when all can."""
    for name in ("question", "evidence", "sql", "reasoning"):
        value = getattr(example, name)
        if value is not None:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return name
    return None


# ------------------------------------------------------------------------------------------------- schema text

_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@functools.lru_cache(maxsize=None)
def _identifier(name: str) -> str:
    """`name` as it must be written in SQLite: bare when SQLite accepts it as a column name, else in backticks.

    SQLite itself is asked, so no keyword list is needed here: `singer_id` stays bare, `order` gets backticks.
    """
    if _PLAIN_NAME.fullmatch(name):
        probe = sqlite3.connect(":memory:")
        try:  # also catches names SQLite reads as something else (current_date is today's date, not the column)
            if probe.execute(f"SELECT {name} FROM (SELECT 'column' AS {name})").fetchall() == [("column",)]:
                return name
        except sqlite3.OperationalError:
            pass
        finally:
            probe.close()
    return "`" + name.replace("`", "``") + "`"


def _quoted(name: str) -> str:
    """An identifier quoted for the statements we run ourselves."""
    return '"' + name.replace('"', '""') + '"'


def _connect_read_only(db_path: str) -> sqlite3.Connection:
    """A read-only connection inside one read transaction: everything read through it comes from one commit, the
    committed state the sandbox reads too. A database that cannot give one (locked past 5 s, a hot journal, WAL in
    a read-only folder) or is not SQLite is refused by name."""
    path = Path(db_path)
    if not path.is_file():
        raise FileNotFoundError(f"database {path} not found")
    lock_wait = 5.0  # seconds to wait for a writer's commit
    conn = None
    try:
        conn = sqlite3.connect(read_only_uri(path.resolve()), uri=True, timeout=lock_wait, isolation_level=None)
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchall()  # the read transaction starts here
        return conn
    except sqlite3.Error as e:
        if conn is not None:
            conn.close()
        problem = committed_read_problem(e, db_path, lock_wait)
        raise ValueError(problem[1] if problem else
                         f"database {db_path}: cannot read its schema ({e}); is it an SQLite file?") from None


def _example_values(conn: sqlite3.Connection, table: str, column: str, k: int) -> list:
    """Up to k distinct, non-null, non-empty, non-blob values of a column, strings cut to MAX_VALUE_CHARS."""
    col = _quoted(column)
    rows = conn.execute(f"SELECT DISTINCT {col} FROM (SELECT {col} FROM {_quoted(table)} LIMIT {SAMPLE_SCAN_ROWS}) "
                        f"WHERE {col} IS NOT NULL AND {col} != '' AND typeof({col}) != 'blob' LIMIT {k}").fetchall()
    return [v[:MAX_VALUE_CHARS] if isinstance(v, str) else v for (v,) in rows]


def _create_table(conn: sqlite3.Connection, table: str, sample_values: int) -> str:
    """One table as a CREATE TABLE statement, one column per line, then its primary and foreign keys:

        CREATE TABLE singer (
          singer_id INTEGER, -- example: [1, 2]
          name TEXT, -- example: ['Joe Sharp', 'Timbaland']
          country_id INTEGER,
          PRIMARY KEY (singer_id),
          FOREIGN KEY (country_id) REFERENCES country (id)
        );
    """
    columns = conn.execute(f"PRAGMA table_info({_quoted(table)})").fetchall()  # cid, name, type, notnull, dflt, pk
    lines = []  # (definition, comment)
    for _, name, col_type, _, _, _ in columns:
        values = _example_values(conn, table, name, sample_values) if sample_values > 0 else []
        lines.append((f"{_identifier(name)} {col_type}".rstrip(), f"example: {values}" if values else ""))
    pk = [c[1] for c in sorted(columns, key=lambda c: c[5]) if c[5] > 0]  # c[5]: position in the primary key
    if pk:
        lines.append((f"PRIMARY KEY ({', '.join(map(_identifier, pk))})", ""))
    foreign: dict[int, tuple[str, list[str], list[str | None]]] = {}
    for fk_id, _, parent, child_col, parent_col, *_ in conn.execute(f"PRAGMA foreign_key_list({_quoted(table)})"):
        foreign.setdefault(fk_id, (parent, [], []))
        foreign[fk_id][1].append(child_col)
        foreign[fk_id][2].append(parent_col)
    for fk_id in sorted(foreign):
        parent, child_cols, parent_cols = foreign[fk_id]
        target = _identifier(parent)
        if all(parent_cols):  # None: the parent's primary key is meant
            target += f" ({', '.join(map(_identifier, parent_cols))})"
        lines.append((f"FOREIGN KEY ({', '.join(map(_identifier, child_cols))}) REFERENCES {target}", ""))
    body = []
    for i, (definition, comment) in enumerate(lines):
        comma = "," if i < len(lines) - 1 else ""
        body.append(f"  {definition}{comma}" + (f" -- {comment}" if comment else ""))
    return f"CREATE TABLE {_identifier(table)} (\n" + "\n".join(body) + "\n);"


@functools.lru_cache(maxsize=256)
def _table_statements(db_path: str, sample_values: int) -> tuple[tuple[str, str], ...]:
    """(table name, CREATE TABLE text) for every user table, in sqlite_master (creation) order. Cached: data set
    databases do not change during a run."""
    conn = _connect_read_only(db_path)
    conn.text_factory = lambda b: b.decode(errors="replace")  # example values in bad UTF-8 still show
    try:
        names = [name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, 7) != 'sqlite_' ORDER BY rowid")]
        if not names:
            raise ValueError(f"database {db_path} has no tables: an empty or unfinished file? re-download it")
        return tuple((name, _create_table(conn, name, sample_values)) for name in names)
    except sqlite3.Error as e:
        raise ValueError(f"database {db_path}: cannot read its schema ({e}); is it an SQLite file?") from None
    finally:
        conn.close()


def table_names(db_path: str | Path) -> list[str]:
    """The user tables of a database, in sqlite_master (creation) order."""
    return [name for name, _ in _table_statements(str(db_path), 0)]


def schema_text(db_path: str | Path, sample_values: int = 0, tables: list[str] | None = None) -> str:
    """The database's schema read from the SQLite file, as CREATE TABLE statements separated by blank lines.

    Tables come in sqlite_master order (the order they were created, which usually puts referenced tables first),
    whatever the order of `tables` (a subset to keep; None keeps all). Columns are listed from PRAGMA table_info,
    with the primary key and foreign keys after them; with `sample_values=k > 0`, a comment after each column shows up
    to k distinct non-null values from its first SAMPLE_SCAN_ROWS rows, as in OmniSQL's prompts. The same file and
    arguments always give the same text.
    """
    statements = _table_statements(str(db_path), sample_values)
    if tables is not None:
        unknown = set(tables) - {name for name, _ in statements}
        if unknown:
            raise ValueError(f"tables {sorted(unknown)} are not in database {db_path}")
        statements = tuple((name, text) for name, text in statements if name in tables)
    return "\n\n".join(text for _, text in statements)


def fit_schema(db_path: str | Path, count_tokens: Callable[[str], int], budget: int,
               sample_values: int) -> tuple[str, list[str]]:
    """The largest schema text with count_tokens(text) <= budget, and the tables dropped to get there.

    Shrinks in this order: first the example values go, then whole tables, the last in sqlite_master order first
    (a deterministic rule that needs no question analysis; referenced tables tend to come first). A warning lists
    what was dropped. If even no table fits, returns "" with every table dropped: the caller decides what an
    over-long prompt means. `count_tokens` may count more than the schema: `build_prompt` counts the whole prompt.
    """
    if count_tokens(text := schema_text(db_path, sample_values)) <= budget:
        return text, []
    names = table_names(db_path)
    keep = len(names)
    while keep > 0 and count_tokens(schema_text(db_path, 0, names[:keep])) > budget:
        keep -= 1
    dropped = names[keep:]
    values = "example values and " if sample_values > 0 else ""
    warnings.warn(f"schema of {db_path} is over {budget} tokens: dropped {values}{len(dropped)} tables {dropped}",
                  stacklevel=2)
    return schema_text(db_path, 0, names[:keep]), dropped


# ----------------------------------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    """A rendered prompt: its ChatML text, token ids, and the tables left out to respect the token budget."""

    text: str
    ids: list[int]
    dropped_tables: list[str]


def build_prompt(example: Example, tokenizer: Tokenizer, template: str = SQLR1_PROMPT, max_prompt_tokens: int = 4096,
                 sample_values: int = 0, system: str | None = None) -> Prompt:
    """Render `template` for `example` as a ChatML conversation ending in the assistant turn pre-filled with
    `<think>\\n`:

        <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{template}<|im_end|>\\n
        <|im_start|>assistant\\n<think>\\n

    `system=None` leaves the system turn to the tokenizer (Qwen's default). The template's fields are {schema},
    {question} and {external_knowledge} (EVIDENCE_SECTION when the example has evidence, else empty). When the
    prompt is longer than `max_prompt_tokens`, the schema is shrunk by `fit_schema`; if even an empty schema does
    not fit, the question (with evidence and template) is what is too long: a warning says so and by how many
    tokens, and that over-long prompt, with every table dropped, is returned (`filter_for_rl` drops those).
    Text that UTF-8 cannot encode (a lone surrogate) is a ValueError naming the example.
    """
    bad_field = _lone_surrogate_field(example)
    if bad_field is not None:
        raise ValueError(f"example ({example.db_id}: {example.question[:60]!r}): its {bad_field} is not valid Unicode "
                         "(a lone surrogate, left by a badly decoded file or argument); fix its encoding")

    def render(schema: str) -> str:
        knowledge = EVIDENCE_SECTION.format(evidence=example.evidence.strip()) if example.evidence.strip() else ""
        try:
            user = template.format(schema=schema, question=example.question.strip(), external_knowledge=knowledge)
        except (KeyError, IndexError) as e:
            raise ValueError(f"prompt template field {e} is unknown: use {{schema}}, {{question}}, "
                             "{external_knowledge}") from None
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": user})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, assistant_prefix=THINK_PREFIX)

    text = render(schema_text(example.db_path, sample_values))
    ids = tokenizer.encode(text)
    dropped: list[str] = []
    if len(ids) > max_prompt_tokens:
        text = render("")
        ids = tokenizer.encode(text)
        if len(ids) > max_prompt_tokens:  # no schema to blame: the rest of the prompt alone is over the budget
            what = "question and its evidence" if example.evidence.strip() else "question"
            warnings.warn(f"example ({example.db_id}: {example.question[:60]!r}): the prompt is {len(ids)} tokens "
                          f"even without the schema, {len(ids) - max_prompt_tokens} over max_prompt_tokens="
                          f"{max_prompt_tokens}: the {what} (with the template) is too long; shorten it or raise "
                          "the limit", stacklevel=2)
            return Prompt(text, ids, table_names(example.db_path))
        schema, dropped = fit_schema(example.db_path, lambda s: len(tokenizer.encode(render(s))), max_prompt_tokens,
                                     sample_values)
        text = render(schema)
        ids = tokenizer.encode(text)
    return Prompt(text, ids, dropped)


def sft_response(example: Example) -> str:
    """The cold-start SFT target, continuing the prompt's pre-filled `<think>\\n` (the trainer appends EOS):

        {reasoning}\\n</think>\\n<answer>\\n```sql\\n{sql}\\n```\\n</answer>

    Without a reasoning trace the think block holds SQL_ONLY_THINK (the "SQL only" cold start).
    """
    reasoning = SQL_ONLY_THINK if example.reasoning is None else example.reasoning.strip()
    for tag in RESPONSE_TAGS:
        if tag in reasoning or tag in example.sql:
            raise ValueError(f"example ({example.db_id}: {example.question[:60]!r}): its reasoning or SQL contains "
                             f"{tag}, which would break the response format; clean the record")
    return f"{reasoning}\n</think>\n<answer>\n```sql\n{example.sql.strip()}\n```\n</answer>"


# ------------------------------------------------------------------------------------------------- RL filters

FILTER_REASONS = ("prompt_too_long", "gold_error", "gold_timeout", "gold_empty")


def filter_for_rl(examples: list[Example], prompts: list[Prompt], sandbox: Sandbox, max_prompt_tokens: int,
                  drop_empty_gold: bool = True, timeout: float | None = None) -> tuple[list[int], dict[str, int]]:
    """Indices of the examples GRPO can learn from, and how many were dropped for each reason in FILTER_REASONS.

    Dropped: prompts longer than `max_prompt_tokens` (never truncated: a cut prompt has no question or no
    generation prompt); gold SQL that fails or times out (every completion would get the same reward, hence zero
    advantage); with `drop_empty_gold`, gold SQL returning no rows (any query with an empty result would match it).
    The golds of the prompts that fit are executed in one `sandbox.execute_many` call (`timeout`: its deadline).
    """
    if len(examples) != len(prompts):
        raise ValueError(f"filter_for_rl: {len(examples)} examples but {len(prompts)} prompts")
    counts = dict.fromkeys(FILTER_REASONS, 0)
    fits = [i for i, p in enumerate(prompts) if len(p.ids) <= max_prompt_tokens]
    counts["prompt_too_long"] = len(examples) - len(fits)
    results = sandbox.execute_many([(str(examples[i].db_path), examples[i].sql) for i in fits], timeout=timeout)
    kept = []
    for i, result in zip(fits, results):
        if result.status == "timeout":
            counts["gold_timeout"] += 1
        elif not result.ok:
            counts["gold_error"] += 1
        elif drop_empty_gold and not result.rows:
            counts["gold_empty"] += 1
        else:
            kept.append(i)
    return kept, counts
