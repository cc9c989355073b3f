"""Tests for sqlr1/sampling.py on tiny random Qwen2 models (fp32, CPU)."""

import pytest
import torch

from sqlr1.checkpoint import config_to_hf
from sqlr1.model import ModelConfig, Qwen2
from sqlr1.sampling import SamplingParams, generate

VOCAB = 96  # the "tokenizer" vocabulary; the model has 128 embedding rows (Qwen-style padding)
PROMPTS = [[3, 17, 42, 8, 5], [60, 2], [11, 12, 13, 14, 15, 16, 17, 18, 19], [7]]


def gen(model: Qwen2, prompts: list[list[int]], num_samples: int = 1, share_prefix: bool = True, **params):
    """generate() with the sampling parameters as keywords."""
    return generate(model, prompts, num_samples, SamplingParams(**params), share_prefix=share_prefix)


def tiny_model(seed: int = 0, std: float = 0.3, tie: bool = True) -> Qwen2:
    cfg = ModelConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
    )
    model = Qwen2(cfg)
    model.init_weights(std=std, generator=torch.Generator().manual_seed(seed))
    return model


@pytest.fixture(scope="module")
def model() -> Qwen2:
    return tiny_model()


def uncached_greedy(model: Qwen2, prompt: list[int], n: int, vocab_size: int) -> list[int]:
    """Reference: full forward pass over the whole sequence at every step, argmax of the last logits."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1, :vocab_size]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def test_greedy_equals_uncached_argmax(model):
    out = gen(model, PROMPTS, max_new_tokens=20, temperature=0, vocab_size=VOCAB)
    assert out.prompt_index == [0, 1, 2, 3]
    assert out.finish_reason == ["length"] * 4
    for prompt, tokens in zip(PROMPTS, out.tokens):
        assert tokens == uncached_greedy(model, prompt, 20, VOCAB)


def test_greedy_equals_transformers(model):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config_to_hf(model.config)))
    state = {("" if k.startswith("lm_head") else "model.") + k: v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    hf.eval()
    L = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in PROMPTS])
    attention_mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=16, min_new_tokens=16,
            eos_token_id=None, pad_token_id=0,
        )[:, L:]
    ours = gen(model, PROMPTS, max_new_tokens=16, temperature=0)  # full vocabulary, like HF
    assert ours.tokens == ref.tolist()


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (10, 0.8)])
def test_logprobs_equal_teacher_forced(model, top_k, top_p):
    T = 0.7
    out = gen(
        model, PROMPTS, num_samples=3, max_new_tokens=12, temperature=T, top_k=top_k, top_p=top_p,
        stop_ids=[4, 9], vocab_size=VOCAB, seed=1,
    )
    for i, tokens, logprobs in zip(out.prompt_index, out.tokens, out.logprobs):
        prompt = PROMPTS[i]
        assert len(tokens) == len(logprobs) >= 1
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            ref, _ = model.token_logprobs(ids, start=len(prompt) - 1, temperature=T, vocab_size=VOCAB)
        torch.testing.assert_close(torch.tensor(logprobs), ref[0], atol=1e-4, rtol=0)


def test_greedy_logprob_uses_temperature_one(model):
    out = gen(model, PROMPTS[:1], max_new_tokens=6, temperature=0, vocab_size=VOCAB)
    ids = torch.tensor([PROMPTS[0] + out.tokens[0]])
    with torch.no_grad():
        ref, _ = model.token_logprobs(ids, start=len(PROMPTS[0]) - 1, temperature=1.0, vocab_size=VOCAB)
    torch.testing.assert_close(torch.tensor(out.logprobs[0]), ref[0], atol=1e-4, rtol=0)


def test_mixed_length_batch_equals_each_prompt_alone(model):
    batch = gen(model, PROMPTS, max_new_tokens=15, temperature=0, vocab_size=VOCAB)
    for prompt, tokens, logprobs in zip(PROMPTS, batch.tokens, batch.logprobs):
        alone = gen(model, [prompt], max_new_tokens=15, temperature=0, vocab_size=VOCAB)
        assert alone.tokens[0] == tokens
        torch.testing.assert_close(torch.tensor(alone.logprobs[0]), torch.tensor(logprobs), atol=1e-4, rtol=0)


def test_seeded_samples_do_not_depend_on_other_prompts(model):
    # Same number of prompts (the documented guarantee), different contents and lengths around prompt 1.
    kwargs = dict(num_samples=4, max_new_tokens=15, temperature=1.0, top_p=0.9, vocab_size=VOCAB, seed=7)
    a = gen(model, [PROMPTS[0], PROMPTS[2], PROMPTS[1]], **kwargs)
    b = gen(model, [[5] * 30, PROMPTS[2], [1, 2, 3]], **kwargs)
    assert a.tokens[4:8] == b.tokens[4:8]
    assert a.tokens[0:4] != b.tokens[0:4]  # the other prompts did change (the test can fail)


def test_same_seed_same_samples_other_seed_differs(model):
    kwargs = dict(num_samples=4, max_new_tokens=10, temperature=1.0, vocab_size=VOCAB)
    a = gen(model, PROMPTS, seed=3, **kwargs)
    assert gen(model, PROMPTS, seed=3, **kwargs) == a
    assert gen(model, PROMPTS, seed=4, **kwargs).tokens != a.tokens


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_prefix_shared_equals_unshared(model, temperature):
    kwargs = dict(num_samples=5, max_new_tokens=20, temperature=temperature, top_k=40, top_p=0.95,
                  stop_ids=[4, 9, 33], vocab_size=VOCAB, seed=11)
    shared = gen(model, PROMPTS, share_prefix=True, **kwargs)
    unshared = gen(model, PROMPTS, share_prefix=False, **kwargs)
    assert shared.tokens == unshared.tokens
    assert shared.finish_reason == unshared.finish_reason
    for a, b in zip(shared.logprobs, unshared.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    if temperature > 0:  # the G samples of one prompt are different draws
        assert len({tuple(t) for t in shared.tokens[:5]}) > 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_padded_vocab_ids_never_sampled(temperature):
    model = tiny_model(tie=False)
    with torch.no_grad():  # padded head rows: large random vectors, so their logits dominate
        model.lm_head.weight[VOCAB:] = torch.randn(128 - VOCAB, 64, generator=torch.Generator().manual_seed(1)) * 5
    kwargs = dict(num_samples=3, max_new_tokens=10, temperature=temperature, seed=0)
    full = gen(model, PROMPTS, **kwargs)
    assert sum(t >= VOCAB for row in full.tokens for t in row) > 0.9 * sum(map(len, full.tokens))  # premise
    restricted = gen(model, PROMPTS, vocab_size=VOCAB, **kwargs)
    assert all(t < VOCAB for row in restricted.tokens for t in row)


def test_stop_tokens_truncate_greedy(model):
    free = [uncached_greedy(model, p, 20, VOCAB) for p in PROMPTS]
    stop = free[0][6]  # first greedy row reaches it at step <= 6, other rows at other steps or never
    out = gen(model, PROMPTS, max_new_tokens=20, temperature=0, stop_ids=[stop], vocab_size=VOCAB,
                   check_every=3)
    for ref, tokens, logprobs, reason in zip(free, out.tokens, out.logprobs, out.finish_reason):
        if stop in ref:
            assert tokens == ref[: ref.index(stop) + 1] and reason == "stop"
        else:
            assert tokens == ref and reason == "length"
        assert len(logprobs) == len(tokens)
    assert "stop" in out.finish_reason


def test_compaction_equals_no_compaction(model):
    kwargs = dict(num_samples=6, max_new_tokens=40, temperature=1.0, stop_ids=[4, 9, 33, 50],
                  vocab_size=VOCAB, seed=5)
    every_step = gen(model, PROMPTS, check_every=1, **kwargs)
    sometimes = gen(model, PROMPTS, check_every=7, **kwargs)
    never = gen(model, PROMPTS, check_every=1000, **kwargs)
    lengths = [len(t) for t in every_step.tokens]
    assert len(set(lengths)) > 3 and {"stop", "length"} == set(every_step.finish_reason)  # rows end at many steps
    for other in (sometimes, never):
        assert other.tokens == every_step.tokens and other.finish_reason == every_step.finish_reason
        for a, b in zip(other.logprobs, every_step.logprobs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    stops = set(kwargs["stop_ids"])
    for tokens, reason in zip(every_step.tokens, every_step.finish_reason):
        assert not stops & set(tokens[:-1])  # nothing after the first stop id
        assert (tokens[-1] in stops) == (reason == "stop")
        assert reason == "stop" or len(tokens) == 40


def test_top_k_one_and_tiny_top_p_equal_greedy(model):
    greedy = gen(model, PROMPTS, max_new_tokens=12, temperature=0, vocab_size=VOCAB)
    for kwargs in (dict(top_k=1), dict(top_p=1e-6)):
        out = gen(model, PROMPTS, num_samples=2, max_new_tokens=12, temperature=1.0, vocab_size=VOCAB,
                       seed=0, **kwargs)
        assert out.tokens == [t for t in greedy.tokens for _ in range(2)]
        for a, b in zip(out.logprobs[::2], greedy.logprobs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)


def test_samples_follow_the_truncated_distribution():
    model = tiny_model(std=0.1)
    prompt, T, n = [5, 6, 7], 0.8, 4000
    with torch.no_grad():
        p = (model(torch.tensor([prompt]))[0, -1, :VOCAB] / T).softmax(-1)
    out = gen(model, [prompt], num_samples=n, max_new_tokens=1, temperature=T, vocab_size=VOCAB, seed=2)
    freq = torch.bincount(torch.tensor([t[0] for t in out.tokens]), minlength=VOCAB).float() / n
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / n).sqrt().max()  # within 4 standard errors
    top8 = set(p.topk(8).indices.tolist())
    out = gen(model, [prompt], num_samples=500, max_new_tokens=1, temperature=T, top_k=8, vocab_size=VOCAB,
                   seed=2)
    assert {t[0] for t in out.tokens} == top8
    sorted_p, order = p.sort(descending=True)
    nucleus = set(order[: int((sorted_p.cumsum(0) < 0.5).sum()) + 1].tolist())
    out = gen(model, [prompt], num_samples=500, max_new_tokens=1, temperature=T, top_p=0.5, vocab_size=VOCAB,
                   seed=2)
    assert {t[0] for t in out.tokens} == nucleus


def test_restores_training_mode(model):
    model.train()
    gen(model, PROMPTS[:1], max_new_tokens=2)
    assert model.training
    model.eval()
    gen(model, PROMPTS[:1], max_new_tokens=2)
    assert not model.training


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(prompts=[]), "prompts"),
        (dict(prompts=[[1, 2], []]), r"prompts\[1\]"),
        (dict(prompts=[[1] * 257]), "max_position_embeddings"),
        (dict(prompts=[[1, 500]]), r"prompts\[0\]"),
        (dict(num_samples=0), "num_samples"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(vocab_size=129), "vocab_size"),
        (dict(check_every=0), "check_every"),
    ],
)
def test_bad_input_raises_value_error(model, kwargs, argument):
    kwargs = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=argument):
        gen(model, **kwargs)


def test_compiled_decode_step_gives_same_results(model):
    # ~25 s on 2 cores with a cold inductor cache (compaction makes the batch size change: one dynamic recompile).
    kwargs = dict(num_samples=3, max_new_tokens=16, stop_ids=[4, 9, 33], vocab_size=VOCAB, seed=0, check_every=2)
    for temperature in (0.0, 1.0):
        eager = gen(model, PROMPTS, temperature=temperature, **kwargs)
        compiled = gen(model, PROMPTS, temperature=temperature, compile=True, **kwargs)
        assert compiled.tokens == eager.tokens
        assert compiled.finish_reason == eager.finish_reason


def test_compiled_decode_builds_a_bounded_number_of_graphs(model, compiled_graphs):
    """Over a run's sequence of calls (greedy evaluation, rollouts at two temperatures, compaction down to one live
    row, other prompt lengths, a one-row call) the compiled decode step builds at most 2 graphs (greedy, sampled),
    not one per temperature / batch size / width; dynamo's recompile limit is 8. Graphs are counted by a backend that
    runs them as captured, so every call is also checked against eager decoding."""
    stops = [1, 2, 3, 4, 5, 6, 7, 8]
    calls = [
        dict(prompts=PROMPTS, temperature=0.0),  # greedy evaluation
        dict(prompts=PROMPTS, temperature=1.1, num_samples=3),  # rollouts
        dict(prompts=[[9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [30, 31]], temperature=0.8, num_samples=2),
        dict(prompts=PROMPTS[:1], temperature=0.8),  # one row: eager, never a batch-1 graph
        dict(prompts=PROMPTS[1:3], temperature=0.0),
    ]
    for kw in calls:
        kw = dict(max_new_tokens=16, stop_ids=stops, vocab_size=VOCAB, seed=0, check_every=1, **kw)
        eager = gen(model, **kw)
        compiled = gen(model, compile=True, **kw)
        assert (compiled.tokens, compiled.finish_reason) == (eager.tokens, eager.finish_reason)
        torch.testing.assert_close(compiled.logprobs, eager.logprobs, atol=1e-5, rtol=0)
        if len(kw["prompts"]) == 4:  # one row outlives all others: the live batch reaches 1
            lengths = sorted(map(len, eager.tokens))
            assert lengths[-2] < lengths[-1]
    assert len(compiled_graphs) <= 2, f"{len(compiled_graphs)} decode graphs"
