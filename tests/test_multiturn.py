"""Multi-turn rollouts: the sampler's pause hook (generic, no SQL), the SQL environment, and their training masks."""

import pytest
import torch

from sqlr1.sampling import generate
from tests.test_sampling import PROMPTS, VOCAB, tiny_model

PAUSE = tuple(range(0, VOCAB, 3))  # a third of the ids pause: random tiny models hit them often


def observation(generated: list[int]) -> list[int]:
    """A deterministic 'environment': 0-3 tokens that depend on the row's completion so far only."""
    n = (sum(generated) + len(generated)) % 4
    return [(7 * sum(generated) + 5 * i) % VOCAB for i in range(n)]


def hook(calls: list | None = None):
    def on_pause(rows, generated):
        if calls is not None:
            calls.append(list(rows))
        return [observation(g) for g in generated]
    return on_pause


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
    args = dict(max_new_tokens=24, temperature=0, vocab_size=VOCAB, pause_ids=PAUSE, on_pause=hook())
    return generate(model, prompts, **{**args, **kw})


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
    calls = []
    out = generate(model, PROMPTS, num_samples=2, max_new_tokens=10, temperature=1.0, seed=1, vocab_size=VOCAB,
                   pause_ids=PAUSE, on_pause=hook(calls))
    assert all(len(t) == 10 for t in out.tokens) and out.finish_reason == ["length"] * 8
    assert any(len(c) > 1 for c in calls)  # rows pausing at the same step share one call
    assert all(len(set(c)) == len(c) for c in calls)


def test_long_observation_grows_the_cache_and_is_clipped_to_the_budget(model):
    def flood(rows, generated):
        return [[1 + i % 50 for i in range(40)] for _ in rows]  # wider than L + max_new_tokens
    out = generate(model, PROMPTS, max_new_tokens=30, temperature=0, vocab_size=VOCAB, pause_ids=PAUSE, on_pause=flood)
    for tokens, flags in zip(out.tokens, out.model_mask):
        assert len(tokens) == 30
        first = flags.index(False) if False in flags else None
        if first is not None:
            assert tokens[first : 30] == [1 + i % 50 for i in range(30 - first)]


def test_single_turn_has_all_model_tokens(model):
    out = generate(model, PROMPTS, max_new_tokens=6, temperature=0, vocab_size=VOCAB)
    assert out.model_mask == [[True] * 6] * 4
