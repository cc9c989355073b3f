"""The SQL environment of a rollout: single turn (SQL-R1 as published), or multi-turn, where a row may run queries
inside its reasoning and read their results before it answers:

    ... <sql>SELECT name FROM city WHERE name LIKE '%paris%'</sql>
    <observation>
    name
    Paris
    </observation>
    ...

The sampler pauses a row whenever it samples a token whose text holds ">" (`pause_ids`: the last token of "</sql>"
always does, however a byte-level BPE cuts it). A `<sql>...</sql>` closed before `</think>` runs against the row's
database (read-only, the usual deadline; all of a step's queries in one sandbox call fetching `row_limit` rows each)
and the column names and first rows, "error: <SQLite's message>" or "timeout" are appended, cut to
`max_obs_tokens`; past `max_turns` queries a `<sql>` is not run and the observation says so. Observations stay in
the sequence the policy sees but out of its loss (`Episodes.loss_mask`); the reward reads the model's own text
(`Episodes.texts`), so what the database returned never counts as the model's answer.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from sqlr1.data import MAX_VALUE_CHARS
from sqlr1.sampling import Samples, SamplingParams, generate
from sqlr1.sandbox import ExecResult, Sandbox
from sqlr1.tokenizer import Tokenizer

OPEN, CLOSE = "<sql>", "</sql>"
OBS_OPEN, OBS_CLOSE = "\n<observation>\n", "\n</observation>\n"
_OBSERVATION = re.compile(re.escape(OBS_OPEN) + "(.*?)" + re.escape(OBS_CLOSE), re.DOTALL)


@functools.cache
def pause_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Ids whose text contains ">": every way a tokenizer can end "</sql>" (one pass over the vocabulary)."""
    return tuple(i for i in range(tokenizer.vocab_size) if ">" in tokenizer.decode([i]))


def model_text(tokenizer: Tokenizer, tokens: list[int], model_mask: list[bool] | None = None) -> str:
    """A completion's text without its stop token (special tokens kept: the reasoning tags may be special tokens);
    with model_mask, as the model wrote it: observations (model_mask False) left out."""
    ids = tokens if model_mask is None else [t for t, m in zip(tokens, model_mask) if m]
    if ids and ids[-1] in tokenizer.eos_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def _cell(v) -> str:
    """A value's text, at most MAX_VALUE_CHARS characters (a huge text or blob is cut before it is converted)."""
    if v is None:
        return "NULL"
    return str(v[:MAX_VALUE_CHARS] if isinstance(v, (str, bytes)) else v)[:MAX_VALUE_CHARS]


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
class Episodes:
    """A rollout batch as training and evaluation read it (row r = sample r % G of prompt r // G)."""

    samples: Samples  # tokens (observations included), the sampler's log-probs, which tokens were sampled
    texts: list[str]  # what each row wrote itself, stop token left out: what the reward reads
    transcripts: list[str]  # each row's whole completion, observations included: what the logs show
    turns: list[list[Turn]]  # each row's queries ([] in single turn)
    multi_turn: bool

    def loss_mask(self, row: int) -> list[float] | None:
        """Per token 1 (the model's own) or 0 (an observation: in the input, out of the loss); None: all 1."""
        own = self.samples.model_mask[row]
        return None if all(own) else [float(m) for m in own]

    def queries(self, row: int) -> int:
        """The queries row `row` ran (a refused one was not run)."""
        return sum(t.status != "refused" for t in self.turns[row])

    def stats(self) -> dict[str, float]:
        """Sums over the batch for the logs ({} in single turn): queries run, rows that queried, queries that
        failed (error / timeout), observation tokens. Sum over ranks, then `episode_metrics`."""
        if not self.multi_turn:
            return {}
        return {"queries": sum(len(t) for t in self.turns), "querying_rows": sum(bool(t) for t in self.turns),
                "query_errors": sum(x.status in ("error", "timeout") for t in self.turns for x in t),
                "obs_tokens": sum(m.count(False) for m in self.samples.model_mask)}


def episode_metrics(summed: dict[str, float], n: float) -> dict[str, float]:
    """`Episodes.stats` summed over n completions -> per-completion means (nothing in single turn)."""
    if not summed:
        return {}
    return {"queries_per_completion": summed["queries"] / n, "query_rate": summed["querying_rows"] / n,
            "obs_tokens_mean": summed["obs_tokens"] / n,
            "query_errors": summed["query_errors"] / max(summed["queries"], 1)}


@dataclass
class SqlEnv:
    """The environment of a run's rollouts: single turn (max_turns = 0, SQL-R1 as published) or multi-turn, where a
    rollout may run up to max_turns queries inside <think>, each answered with row_limit rows cut to
    max_obs_tokens tokens, within `timeout` seconds."""

    sandbox: Sandbox
    tokenizer: Tokenizer
    max_turns: int = 0
    row_limit: int = 5
    max_obs_tokens: int = 128
    timeout: float = 5.0

    def __post_init__(self):
        if self.max_turns < 0 or self.row_limit < 1 or self.max_obs_tokens < 8:
            raise ValueError(f"SqlEnv: max_turns={self.max_turns} must be >= 0, row_limit={self.row_limit} >= 1, "
                             f"max_obs_tokens={self.max_obs_tokens} >= 8")

    def rollout(self, model, prompts: list[list[int]], db_paths: list, num_samples: int, params: SamplingParams,
                progress: bool | None = False) -> Episodes:
        """`num_samples` episodes per prompt, prompt i asking about db_paths[i]: plain sampling in single turn;
        multi-turn, the sampler pauses rows on `pause_ids` and an `EpisodeState` answers their queries."""
        state = EpisodeState(self, [str(db) for db in db_paths for _ in range(num_samples)]) if self.max_turns else None
        samples = generate(model, prompts, num_samples, params, pause=state, progress=progress)
        transcripts = [model_text(self.tokenizer, t) for t in samples.tokens]
        texts = [model_text(self.tokenizer, t, m) for t, m in zip(samples.tokens, samples.model_mask)] if state else \
            transcripts
        turns = state.turns if state else [[] for _ in samples.tokens]
        return Episodes(samples, texts, transcripts, turns, multi_turn=state is not None)

    def observation_ids(self, body: str) -> list[int]:
        return observation_tokens(self.tokenizer, body, self.max_obs_tokens)


@dataclass
class EpisodeState:
    """The multi-turn state of one rollout batch, db_paths[r] being row r's database: the sampler's pause hook
    (`ids`, called with the paused rows), and afterwards `turns[r]`, row r's queries."""

    env: SqlEnv
    db_paths: list[str]
    turns: list[list[Turn]] = field(init=False)
    _seen: list[int] = field(init=False)  # tokens of each row already read (up to its last observation or tag)
    _closed: list[bool] = field(init=False)  # the row wrote </think>: no query runs any more

    def __post_init__(self):
        self.turns = [[] for _ in self.db_paths]
        self._seen = [0] * len(self.db_paths)
        self._closed = [False] * len(self.db_paths)

    @property
    def ids(self) -> tuple[int, ...]:
        return pause_ids(self.env.tokenizer)

    def query(self, row: int, generated: list[int]) -> str | None:
        """The SQL of a `<sql>...</sql>` just closed inside <think>, else None. The row's text since its last
        call that saw a "</sql>" or "</think>" is read (so each is looked at once)."""
        text = self.env.tokenizer.decode(generated[self._seen[row]:])
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

    def __call__(self, rows: list[int], generated: list[list[int]]) -> list[list[int]]:
        """The sampler's callback: an observation's tokens for each paused row ([] where nothing was closed); all
        of the step's queries in one `execute_many`."""
        env = self.env
        sqls = [self.query(r, g) for r, g in zip(rows, generated)]
        run = [i for i, (r, q) in enumerate(zip(rows, sqls)) if q is not None and len(self.turns[r]) < env.max_turns]
        results = env.sandbox.execute_many([(self.db_paths[rows[i]], sqls[i]) for i in run], timeout=env.timeout,
                                           row_limit=env.row_limit) if run else []
        by_index = dict(zip(run, results))
        out = []
        for i, (r, q, g) in enumerate(zip(rows, sqls, generated)):
            if q is None:
                out.append([])
                continue
            if i in by_index:
                status, body = by_index[i].status, render(by_index[i], env.row_limit)
            else:
                status, body = "refused", f"not executed: the limit of {env.max_turns} queries is reached"
            ids = env.observation_ids(body)
            self.turns[r].append(Turn(q, status, env.tokenizer.decode(ids)))
            self._seen[r] = len(g) + len(ids)
            out.append(ids)
        return out
