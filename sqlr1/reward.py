"""SQL-R1's reward (Ma et al. 2025, Sec. 3.2): parse a completion, execute its SQL, score it.

The prompt ends with a pre-filled `<think>`; a well-formed completion is `reasoning </think> <answer> ... ```sql SQL```
... </answer> [anything]`, each tag once and in order (the pre-filled <think> counted), only whitespace between
</think> and <answer>, and a ```sql block in the answer (the last one is the prediction). Components:

    S_f = +1 if the format is right, -1 otherwise
    S_e = +2 if the SQL executes, -2 if it errors or times out      (only when the format is right and the gold ran)
    S_r = +3 if its result equals the gold result, -3 otherwise     (only when it executed and the gold ran)
    S_l = 0.5 * min(1, (len(think) + len(answer)) / L_max) + len(sql) / len(answer)    (only when correct, else 0)
    R   = w_f S_f + w_e S_e + w_r S_r + w_l S_l

Lengths in characters or, with a token counter, tokens; a component switched off (the paper's ablations) is 0. A
gold query that fails makes the pair unscorable: only S_f counts (SQL-R1's release maps the evaluator's "Gold Error"
to exec 0 and result 0), so a failed gold never rewards a query that merely runs; `Reward.gold_error` counts it.
preset="arctic" is Arctic-Text2SQL-R1's plain reward (Yao et al. 2025): R = 1 when the format is right and the
result matches, 0.1 when it only executes, else 0 (the components are still computed, for the logs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from sqlr1.evaluate import MODES, score_pairs
from sqlr1.sandbox import Sandbox

RESPONSE_TAGS = ("<think>", "</think>", "<answer>", "</answer>")  # each once in a well-formed response
_ENV_TAGS = ("<observation>", "</observation>")  # the SQL environment's (sqlr1/sql_env.py): the model may not write them
_LAYOUT = re.compile(r"\s*<think>(.*)</think>\s*<answer>(.*)</answer>.*", re.DOTALL)
_SQL_BLOCK = re.compile(r"```sql(?!\w)\s*(.*?)```", re.IGNORECASE | re.DOTALL)  # not ```sqlite, not ```sqlSELECT


@dataclass(frozen=True)
class Parsed:
    """A parsed completion. `sql` is the answer's last ```sql block; when the format is wrong it is still the
    text's last ```sql block (or None), for lenient uses such as inference."""

    format_ok: bool
    think: str
    answer: str
    sql: str | None


def parse_response(text: str, prefilled_think: bool = True) -> Parsed:
    """Check the <think>/<answer> layout (see the module docstring) and pull out the SQL."""
    full = "<think>" + text if prefilled_think else text
    tags_ok = all(full.count(tag) == 1 for tag in RESPONSE_TAGS) and not any(tag in full for tag in _ENV_TAGS)
    layout = _LAYOUT.fullmatch(full) if tags_ok else None
    blocks = _SQL_BLOCK.findall(layout.group(2)) if layout else []
    if layout and blocks:
        return Parsed(True, layout.group(1).strip(), layout.group(2).strip(), blocks[-1].strip())
    anywhere = _SQL_BLOCK.findall(text)
    return Parsed(False, "", "", anywhere[-1].strip() if anywhere else None)


@dataclass(frozen=True)
class RewardConfig:
    """Weights and switches of R = w_f S_f + w_e S_e + w_r S_r + w_l S_l, and how results are compared."""

    w_f: float = 1.0
    w_e: float = 1.0
    w_r: float = 1.0
    w_l: float = 1.0
    use_format: bool = True
    use_execution: bool = True
    use_result: bool = True
    use_length: bool = True
    l_max: int = 2048
    length_unit: str = "chars"  # "chars" or "tokens" (then pass count_tokens)
    mode: str = "spider"  # result equality: "spider" or "bird" rules (see sqlr1.evaluate)
    timeout: float = 5.0  # seconds per query
    prefilled_think: bool = True
    preset: str = "sqlr1"  # "sqlr1": R = sum of the weighted components; "arctic": 1 / 0.1 / 0 (module docstring)

    def __post_init__(self):
        if self.preset not in ("sqlr1", "arctic"):
            raise ValueError(f"RewardConfig.preset must be 'sqlr1' or 'arctic', got {self.preset!r}")
        if self.length_unit not in ("chars", "tokens"):
            raise ValueError(f"RewardConfig.length_unit must be 'chars' or 'tokens', got {self.length_unit!r}")
        if self.mode not in MODES:
            raise ValueError(f"RewardConfig.mode must be one of {MODES}, got {self.mode!r}")
        if not (self.l_max > 0 and 0 < self.timeout < math.inf):  # NaN fails too
            raise ValueError(f"RewardConfig.l_max={self.l_max} and timeout={self.timeout} must be positive and finite")
        for name in ("w_f", "w_e", "w_r", "w_l"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"RewardConfig.{name}={getattr(self, name)} must be a finite number")


@dataclass(frozen=True)
class Reward:
    """The total and its components (unweighted; 0 when switched off or not reached)."""

    total: float
    format: float
    execution: float
    result: float
    length: float
    correct: bool
    gold_error: bool


def compute_reward(parsed: Parsed, exec_status: str | None, match: bool, cfg: RewardConfig, gold_error: bool = False,
                   count_tokens: Callable[[str], int] | None = None) -> Reward:
    """The reward of one completion, given how its SQL ran ("ok" / "error" / "timeout"; ignored when the format is
    wrong) and whether its result matched the gold result. With `gold_error` only the format reward is given."""
    if cfg.length_unit == "tokens" and count_tokens is None:
        raise ValueError("RewardConfig.length_unit='tokens' needs count_tokens (e.g. a tokenizer's len(encode(s)))")
    size = count_tokens if cfg.length_unit == "tokens" else len
    executed = parsed.format_ok and exec_status == "ok"
    correct = executed and match and not gold_error
    s_f = 1.0 if parsed.format_ok else -1.0
    s_e = (2.0 if executed else -2.0) if parsed.format_ok and not gold_error else 0.0
    s_r = (3.0 if correct else -3.0) if executed and not gold_error else 0.0
    s_l = 0.0
    if correct:
        answer_size = max(size(parsed.answer), 1)
        s_l = 0.5 * min(1.0, (size(parsed.think) + answer_size) / cfg.l_max) + size(parsed.sql) / answer_size
    s_f, s_e, s_r, s_l = (s if on else 0.0 for s, on in zip(
        (s_f, s_e, s_r, s_l), (cfg.use_format, cfg.use_execution, cfg.use_result, cfg.use_length)))
    total = cfg.w_f * s_f + cfg.w_e * s_e + cfg.w_r * s_r + cfg.w_l * s_l
    if cfg.preset == "arctic":
        total = 1.0 if correct else 0.1 if executed and not gold_error else 0.0
    return Reward(total, s_f, s_e, s_r, s_l, correct, gold_error)


def score_batch(sandbox: Sandbox, responses: list[str], golds: list[tuple[str, str]], cfg: RewardConfig,
                gold_cache: dict | None = None, count_tokens: Callable[[str], int] | None = None) -> list[Reward]:
    """Rewards for a whole rollout batch: golds[i] = (db_path, gold_sql) for responses[i].

    One `execute_many` runs every distinct (db, sql) of the batch once; gold results are reused across calls from
    `gold_cache` (default: `sandbox.gold_cache`, alive as long as the pool). Completions with a wrong format are not
    executed; their gold still is (it is cached), so every gold error is reported.
    """
    if len(responses) != len(golds):
        raise ValueError(f"score_batch: {len(responses)} responses but {len(golds)} golds; need one gold each")
    parsed = [parse_response(r, cfg.prefilled_think) for r in responses]
    verdicts = score_pairs(sandbox, [p.sql if p.format_ok else None for p in parsed], [g for _, g in golds],
                           [db for db, _ in golds], mode=cfg.mode, timeout=cfg.timeout, gold_cache=gold_cache)
    return [compute_reward(p, v.pred.status, v.match, cfg, v.gold_error, count_tokens)
            for p, v in zip(parsed, verdicts)]
