"""SQL-R1 reward: response parsing, the component table, switches and weights, and score_batch on a real pool."""

import sqlite3

import pytest

from sqlr1.reward import Parsed, RewardConfig, compute_reward, parse_response, score_batch
from sqlr1.sandbox import Sandbox

GOOD = "The user wants names.</think>\n<answer>\nAnswer:\n```sql\nSELECT name FROM t\n```\n</answer>"


@pytest.mark.parametrize("text, format_ok, sql", [
    (GOOD, True, "SELECT name FROM t"),
    ("  reasoning \n </think>  \n\n <answer>```sql SELECT 1```</answer>\n trailing text <|im_end|>", True, "SELECT 1"),
    ("r</think><answer>```sql\nSELECT 1\n``` then ```SQL\nSELECT 2\n```</answer>", True, "SELECT 2"),  # last block
    ("r</think><answer>SELECT 1</answer>", False, None),  # no sql block
    ("r<answer>```sql\nSELECT 1\n```</answer>", False, "SELECT 1"),  # no </think>: lenient sql still found
    ("<think>again</think><answer>```sql\nSELECT 1\n```</answer>", False, "SELECT 1"),  # second <think>
    ("r</think><answer>```sql\nSELECT 1\n```</answer></answer>", False, "SELECT 1"),  # tag twice
    ("r</think>words<answer>```sql\nSELECT 1\n```</answer>", False, "SELECT 1"),  # text between the parts
    ("<answer>```sql\nSELECT 1\n```</answer></think>", False, "SELECT 1"),  # wrong order
    ("r</think><answer>```sqlite\nSELECT 1\n```</answer>", False, None),  # another fence language: not ```sql
    ("r</think><answer>```sqlSELECT 1```</answer>", False, None),
    ("", False, None),
])
def test_parse_response(text, format_ok, sql):
    parsed = parse_response(text)
    assert (parsed.format_ok, parsed.sql) == (format_ok, sql)


def test_parse_response_without_prefill():
    assert parse_response("<think>r</think><answer>```sql\nSELECT 1\n```</answer>", prefilled_think=False).format_ok
    assert not parse_response("r</think><answer>```sql\nSELECT 1\n```</answer>", prefilled_think=False).format_ok
    parsed = parse_response(GOOD)
    assert parsed.think == "The user wants names."
    assert parsed.answer == "Answer:\n```sql\nSELECT name FROM t\n```"


def length_score(parsed: Parsed, l_max: int = 2048) -> float:
    """S_l written out from the paper's formula, independently of compute_reward."""
    return 0.5 * min(1.0, (len(parsed.think) + len(parsed.answer)) / l_max) + len(parsed.sql) / len(parsed.answer)


BAD = parse_response("no tags at all")
OK = parse_response(GOOD)


@pytest.mark.parametrize("parsed, status, match, expected", [
    (BAD, None, False, (-1, 0, 0, 0)),  # bad format: -1
    (BAD, "ok", True, (-1, 0, 0, 0)),  # bad format, even if something ran: -1
    (OK, "ok", False, (1, 2, -3, 0)),  # executes, wrong: 0
    (OK, "error", False, (1, -2, 0, 0)),  # fails: -1
    (OK, "timeout", False, (1, -2, 0, 0)),  # times out: -1
    (OK, "ok", True, (1, 2, 3, "S_l")),  # correct: 6 + S_l
])
def test_reward_table(parsed, status, match, expected):
    r = compute_reward(parsed, status, match, RewardConfig())
    s_l = length_score(parsed) if expected[3] == "S_l" else 0.0
    assert (r.format, r.execution, r.result, r.length) == pytest.approx((*expected[:3], s_l))
    assert r.total == pytest.approx(sum(expected[:3]) + s_l)
    assert r.correct is (expected[3] == "S_l")
    assert not r.gold_error


@pytest.mark.parametrize("status", ["ok", "error", "timeout"])
def test_gold_error_gives_no_execution_or_result_reward(status):
    """SQL-R1's release: a "Gold Error" verdict scores exec 0 and result 0, whatever the prediction did."""
    r = compute_reward(OK, status, status == "ok", RewardConfig(), gold_error=True)
    assert (r.format, r.execution, r.result, r.length, r.total) == (1, 0, 0, 0, 1)
    assert r.gold_error and not r.correct
    r = compute_reward(BAD, status, False, RewardConfig(), gold_error=True)
    assert (r.format, r.execution, r.total) == (-1, 0, -1)


def test_switches_and_weights():
    cfg = RewardConfig(w_f=0.5, w_e=2.0, w_r=10.0, w_l=4.0)
    r = compute_reward(OK, "ok", True, cfg)
    assert r.total == pytest.approx(0.5 * 1 + 2.0 * 2 + 10.0 * 3 + 4.0 * length_score(OK))
    r = compute_reward(OK, "ok", True, RewardConfig(use_length=False, use_format=False))
    assert (r.format, r.length, r.total) == (0, 0, 5)
    r = compute_reward(OK, "ok", False, RewardConfig(use_result=False, use_execution=False))
    assert r.total == 1
    r = compute_reward(OK, "ok", True, RewardConfig(l_max=10))
    assert r.length == pytest.approx(length_score(OK, l_max=10))  # min(1, .) saturates at 0.5


def test_length_in_tokens():
    words = lambda s: len(s.split())  # a stand-in token counter: whitespace words
    r = compute_reward(OK, "ok", True, RewardConfig(length_unit="tokens", l_max=8), count_tokens=words)
    think, answer, sql = words(OK.think), words(OK.answer), words(OK.sql)
    assert r.length == pytest.approx(0.5 * min(1, (think + answer) / 8) + sql / answer)
    with pytest.raises(ValueError, match="count_tokens"):
        compute_reward(OK, "ok", True, RewardConfig(length_unit="tokens"))
    with pytest.raises(ValueError, match="length_unit"):
        RewardConfig(length_unit="bytes")
    with pytest.raises(ValueError, match="mode"):
        RewardConfig(mode="exact")


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "people.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (id INTEGER, name TEXT, age INTEGER)")
    conn.executemany("INSERT INTO t VALUES (?, ?, ?)", [(1, "ann", 30), (2, "bob", 40), (3, "cy", 50)])
    conn.commit()
    conn.close()
    return path


def respond(sql: str) -> str:
    return f"thinking</think><answer>```sql\n{sql}\n```</answer>"


def test_score_batch(db):
    gold = (str(db), "SELECT name FROM t ORDER BY age")
    responses = [
        respond("SELECT name FROM t ORDER BY age"),  # correct
        respond("SELECT name FROM t ORDER BY age"),  # duplicate
        respond("SELECT name FROM t ORDER BY age DESC"),  # wrong order
        respond("SELECT nme FROM t"),  # error
        "SELECT name FROM t",  # bad format
        respond("SELECT name FROM t"),  # against a broken gold: runs, but no execution reward
        respond("SELECT nme FROM t"),  # against a broken gold: fails, no execution penalty either
    ]
    golds = [gold] * 5 + [(str(db), "SELECT nope FROM t")] * 2
    cache: dict = {}
    with Sandbox(num_workers=2, timeout=5.0) as sandbox:
        rewards = score_batch(sandbox, responses, golds, RewardConfig(), gold_cache=cache)
        again = score_batch(sandbox, responses, golds, RewardConfig())  # default cache: the pool's
        assert set(sandbox.gold_cache) == set(cache)
    expected_length = length_score(parse_response(responses[0]))
    assert [r.total for r in rewards] == pytest.approx([6 + expected_length, 6 + expected_length, 0, -1, -1, 1, 1])
    assert [r.correct for r in rewards] == [True, True, False, False, False, False, False]
    assert [r.gold_error for r in rewards] == [False] * 5 + [True] * 2
    assert set(cache) == {("spider", *gold), ("spider", str(db), "SELECT nope FROM t")}  # golds executed once, kept
    assert again == rewards
    with pytest.raises(ValueError, match="one gold each"):
        score_batch(None, responses, golds[:1], RewardConfig())


OK_SQL = Parsed(True, "think", "```sql\nSELECT 1\n```", "SELECT 1")
BAD_FORMAT = Parsed(False, "", "", "SELECT 1")


@pytest.mark.parametrize("parsed, status, match, gold_error, expected", [
    (OK_SQL, "ok", True, False, 1.0),  # correct
    (OK_SQL, "ok", False, False, 0.1),  # runs, wrong result
    (OK_SQL, "error", False, False, 0.0),  # fails
    (OK_SQL, "timeout", False, False, 0.0),
    (BAD_FORMAT, "ok", True, False, 0.0),  # bad format: nothing, even with the right result
    (OK_SQL, "ok", True, True, 0.0),  # gold error: never a match, and running earns nothing
])
def test_arctic_reward_table(parsed, status, match, gold_error, expected):
    """Arctic-Text2SQL-R1's reward (arXiv 2505.20315): 1 correct, 0.1 runs but wrong, 0 otherwise; the SQL-R1
    components stay as they were, for logging."""
    r = compute_reward(parsed, status, match, RewardConfig(preset="arctic"), gold_error=gold_error)
    sqlr1 = compute_reward(parsed, status, match, RewardConfig(), gold_error=gold_error)
    assert r.total == expected
    assert (r.format, r.execution, r.result, r.length, r.correct) == (
        sqlr1.format, sqlr1.execution, sqlr1.result, sqlr1.length, sqlr1.correct)


def test_arctic_preset_through_score_batch(db):
    gold = (str(db), "SELECT name FROM t ORDER BY age")
    responses = [respond("SELECT name FROM t ORDER BY age"), respond("SELECT age FROM t"), respond("SELECT nme FROM t"),
                 "SELECT name FROM t ORDER BY age", respond("SELECT name FROM t")]
    golds = [gold] * 4 + [(str(db), "SELECT nope FROM t")]
    with Sandbox(num_workers=1, timeout=5.0) as sandbox:
        rewards = score_batch(sandbox, responses, golds, RewardConfig(preset="arctic"))
    assert [r.total for r in rewards] == [1.0, 0.1, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="preset"):
        RewardConfig(preset="snowflake")
