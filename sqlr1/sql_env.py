"""The SQL environment of multi-turn rollouts: run the query a row just wrote, answer with an observation.

Inside its reasoning the model may write `<sql>QUERY</sql>`. The sampler (sqlr1/sampling.py, `on_pause`) pauses a
row whenever it samples a token whose text holds ">" (`pause_ids`: the last token of "</sql>" always does, however
the byte-level BPE cuts or merges it), and `SqlEnv.on_pause` looks at the row's text since its last observation:

    ... <sql>SELECT name FROM city WHERE name LIKE '%paris%'</sql>
    <observation>
    name
    Paris
    </observation>
    ...

A closed `<sql>...</sql>` written before `</think>` is executed against the row's database (sandbox: read-only,
the usual deadline), all of a step's queries in one `execute_many` that fetches only `row_limit` rows each (so a
10-million-row result costs k rows). The observation holds the column names and the first k rows, or
"error: <SQLite's message>", or "timeout", cut to `max_obs_tokens` tokens. After `max_turns` queries a `<sql>` is
not executed and the observation says so. Anything else (a ">" in the reasoning, a "</sql>" after </think>) appends
nothing. The model writing <observation> itself is a format error (sqlr1/reward.py); the reward is computed on the
model's own tokens (`model_text`), so what the database returned never counts as the model's answer.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from sqlr1.sandbox import ExecResult, Sandbox
from sqlr1.tokenizer import Tokenizer

OPEN, CLOSE = "<sql>", "</sql>"
OBS_OPEN, OBS_CLOSE = "\n<observation>\n", "\n</observation>\n"
VALUE_CHARS = 40  # a cell's text is cut to this many characters
_OBSERVATION = re.compile(re.escape(OBS_OPEN) + "(.*?)" + re.escape(OBS_CLOSE), re.DOTALL)


@functools.cache
def pause_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Ids whose text contains ">": every way a tokenizer can end "</sql>" (one pass over the vocabulary)."""
    return tuple(i for i in range(tokenizer.vocab_size) if ">" in tokenizer.decode([i]))


def model_text(tokenizer: Tokenizer, tokens: list[int], model_mask: list[bool] | None) -> str:
    """The completion's text as the model wrote it: observations (model_mask False) left out, stop token dropped."""
    ids = tokens if model_mask is None else [t for t, m in zip(tokens, model_mask) if m]
    if ids and ids[-1] in tokenizer.eos_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def _cell(v) -> str:
    """A value's text, at most VALUE_CHARS characters (a huge text or blob is cut before it is converted)."""
    if v is None:
        return "NULL"
    return str(v[: VALUE_CHARS] if isinstance(v, (str, bytes)) else v)[:VALUE_CHARS]


def _cells(row) -> str:
    return " | ".join(_cell(v) for v in row)


def render(result: ExecResult, row_limit: int) -> str:
    """The observation's body: column names and up to row_limit rows (" | "-separated), or the error."""
    if result.status == "timeout":
        return "timeout"
    if not result.ok:
        return f"error: {result.error}"
    lines = [_cells(result.columns)] + [_cells(r) for r in result.rows[:row_limit]]
    if not result.rows:
        lines.append("(no rows)")
    elif result.truncated:
        lines.append(f"(first {row_limit} rows shown)")
    return "\n".join(lines)


def observation_tokens(tokenizer: Tokenizer, body: str, max_tokens: int) -> list[int]:
    """OBS_OPEN + body + OBS_CLOSE as token ids (each part encoded alone), the body cut to fit max_tokens in all."""
    head, tail, ids = tokenizer.encode(OBS_OPEN), tokenizer.encode(OBS_CLOSE), tokenizer.encode(body)
    room = max_tokens - len(head) - len(tail)
    if len(ids) > room:
        cut = tokenizer.encode(" ...")
        ids = ids[: max(room - len(cut), 0)] + cut
    return head + ids + tail


def encode_with_observations(tokenizer: Tokenizer, text: str, max_tokens: int = 1 << 30) -> tuple[list[int], list[float]]:
    """A multi-turn trace (SFT cold start) as the rollout would hold it: (ids, loss mask), the observations encoded
    as the environment encodes them and masked out (0), the model's text between them 1."""
    ids, mask, at = [], [], 0
    for m in _OBSERVATION.finditer(text):
        own = tokenizer.encode(text[at : m.start()])
        obs = observation_tokens(tokenizer, m.group(1), max_tokens)
        ids += own + obs
        mask += [1.0] * len(own) + [0.0] * len(obs)
        at = m.end()
    own = tokenizer.encode(text[at:])
    return ids + own, mask + [1.0] * len(own)


@dataclass
class Turn:
    """One query of a rollout and what the environment answered."""

    sql: str
    status: str  # "ok" | "error" | "timeout" | "refused" (past max_turns)
    observation: str  # the appended text, as decoded from its tokens


@dataclass
class SqlEnv:
    """One rollout batch: db_paths[r] is row r's database (row r = sample r % G of prompt r // G).

    Pass `on_pause` and `pause_ids(tokenizer)` to `sampling.generate`; afterwards `turns[r]` lists row r's queries.
    """

    sandbox: Sandbox
    tokenizer: Tokenizer
    db_paths: list[str]
    max_turns: int = 5
    row_limit: int = 5
    max_obs_tokens: int = 128
    timeout: float = 5.0
    turns: list[list[Turn]] = field(init=False)
    _seen: list[int] = field(init=False)  # tokens of each row already read (up to its last observation or tag)
    _closed: list[bool] = field(init=False)  # the row wrote </think>: no query runs any more

    def __post_init__(self):
        if self.max_turns < 1 or self.row_limit < 1 or self.max_obs_tokens < 8:
            raise ValueError(f"SqlEnv: max_turns={self.max_turns} and row_limit={self.row_limit} must be >= 1, "
                             f"max_obs_tokens={self.max_obs_tokens} >= 8")
        self.turns = [[] for _ in self.db_paths]
        self._seen = [0] * len(self.db_paths)
        self._closed = [False] * len(self.db_paths)

    def query(self, row: int, generated: list[int]) -> str | None:
        """The SQL of a `<sql>...</sql>` just closed inside <think>, else None. The row's text since its last
        call that saw a "</sql>" or "</think>" is read (so each is looked at once)."""
        text = self.tokenizer.decode(generated[self._seen[row]:])
        end = text.rfind(CLOSE)
        think_end = text.find("</think>")
        if think_end >= 0 and (end < 0 or think_end < end):
            self._closed[row] = True
        if end >= 0 or think_end >= 0:
            self._seen[row] = len(generated)
        start = text.rfind(OPEN, 0, max(end, 0))
        if end < 0 or start < 0 or self._closed[row]:
            return None
        return text[start + len(OPEN) : end].strip()

    def on_pause(self, rows: list[int], generated: list[list[int]]) -> list[list[int]]:
        """The sampler's callback: an observation's tokens for each paused row ([] where nothing was closed)."""
        sqls = [self.query(r, g) for r, g in zip(rows, generated)]
        run = [i for i, (r, q) in enumerate(zip(rows, sqls)) if q is not None and len(self.turns[r]) < self.max_turns]
        results = self.sandbox.execute_many([(self.db_paths[rows[i]], sqls[i]) for i in run], timeout=self.timeout,
                                            row_limit=self.row_limit) if run else []
        by_index = dict(zip(run, results))
        out = []
        for i, (r, q, g) in enumerate(zip(rows, sqls, generated)):
            if q is None:
                out.append([])
                continue
            if i in by_index:
                status, body = by_index[i].status, render(by_index[i], self.row_limit)
            else:
                status, body = "refused", f"not executed: the limit of {self.max_turns} queries is reached"
            ids = self.observation_ids(body)
            self.turns[r].append(Turn(q, status, self.tokenizer.decode(ids)))
            self._seen[r] = len(g) + len(ids)
            out.append(ids)
        return out

    def observation_ids(self, body: str) -> list[int]:
        return observation_tokens(self.tokenizer, body, self.max_obs_tokens)

    def stats(self) -> dict[str, float]:
        """Sums over the batch's rows: queries, rows that queried, queries that failed (error / timeout)."""
        return {"queries": sum(len(t) for t in self.turns), "querying_rows": sum(bool(t) for t in self.turns),
                "query_errors": sum(x.status in ("error", "timeout") for t in self.turns for x in t)}
