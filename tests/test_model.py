"""Tests for sqlr1/model.py on tiny random models (fp32, CPU): padding, the KV cache, gradient checkpointing and
chunked token log-probs against plain full-sequence computations. Parity with transformers: test_checkpoint.py."""

import pytest
import torch
import torch.nn.functional as F

from sqlr1.checkpoint import config_from_hf, config_to_hf
from sqlr1.model import KVCache, ModelConfig, Qwen2, attention, decode_attention

ROWS = 128  # embedding rows; the "tokenizer" below has only VOCAB ids, as Qwen pads 151,665 ids to 152,064 rows
VOCAB = 100


def tiny_model(tie: bool = False, seed: int = 0) -> Qwen2:
    cfg = ModelConfig(vocab_size=ROWS, hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5,
                      num_key_value_heads=1, max_position_embeddings=64, rope_theta=10_000.0,
                      tie_word_embeddings=tie)
    model = Qwen2(cfg)
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-trivial biases and norms, so that every parameter shows up in the outputs
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    return model


def left_padded(lengths: list[int], seed: int = 0, pad: int = 0):
    """Random ids < VOCAB, rows right-aligned to the longest (left padding), and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, T - n :] = 1
    return torch.where(mask.bool(), ids, pad), mask


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_left_padding_is_invisible(tie):
    model = tiny_model(tie)
    ids, mask = left_padded([9, 4, 1], seed=1, pad=7)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        for i, n in enumerate(mask.sum(-1).tolist()):
            alone = model(ids[i : i + 1, -n:])[0]
            torch.testing.assert_close(batch[i, -n:], alone, atol=1e-5, rtol=0)


def test_kv_cache_decoding_equals_full_forward():
    """Prefill, then 1 token per step, then a 3-token chunk: every step's logits equal the uncached forward's."""
    model = tiny_model()
    ids, mask = left_padded([12, 7, 5], seed=2)
    T, P = ids.shape[1], 6
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = KVCache(model.config, batch_size=3, max_len=T)
        steps = [range(0, P)] + [range(t, t + 1) for t in range(P, T - 3)] + [range(T - 3, T)]
        for cols in steps:
            pos = torch.arange(cols.start, cols.stop)
            out = model(ids[:, pos], attention_mask=mask, kv_cache=cache, cache_position=pos)
            real = mask[:, pos].bool()
            torch.testing.assert_close(out[real], full[:, pos][real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (6, 2), (5, 1)])
def test_decode_attention_equals_sdpa(n_head, n_kv):
    """The single-query attention of a decode step (grouped matmuls, no K/V repeat) equals SDPA with GQA, in fp32
    and within bf16 rounding in bf16, with some key columns masked out (padding) in every row."""
    g = torch.Generator().manual_seed(0)
    B, S, D = 3, 11, 8
    q, k, v = torch.randn(B, n_head, 1, D, generator=g), torch.randn(B, n_kv, S, D, generator=g), torch.randn(
        B, n_kv, S, D, generator=g)
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[..., -1] = True  # a query always sees itself
    for dtype, atol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        args = (q.to(dtype), k.to(dtype), v.to(dtype))
        expected = F.scaled_dot_product_attention(*args, attn_mask=mask, enable_gqa=n_kv != n_head)
        bias = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))  # the model's additive form
        torch.testing.assert_close(decode_attention(*args, bias).float(), expected.float(), atol=atol, rtol=0)


def grouped_attention_reference(q, k, v, bias):
    """softmax(q_h K_g^T / sqrt(D) + bias) V_g with g = h // (H / H_kv), written out in float64, K/V never repeated."""
    group = q.shape[1] // k.shape[1]
    out = []
    for h in range(q.shape[1]):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        scores = q[:, h].double() @ kh.transpose(-1, -2) / q.shape[-1] ** 0.5
        if bias is not None:
            scores = scores + bias[:, 0].double()
        else:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        out.append(scores.softmax(-1) @ vh)
    return torch.stack(out, 1)


def test_gqa_attention_passes_grouped_kv_on_cpu(monkeypatch):
    """On CPU every SDPA kernel takes GQA, masked or not: `attention` passes K/V with their H_kv heads and
    enable_gqa (no repeated copies), and the result equals GQA's math in fp32 and bf16."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append((q.shape[1], k.shape[1], v.shape[1], attn_mask is not None, is_causal, enable_gqa, q.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny_model()  # 5 query heads, 1 KV head
    ids, mask = left_padded([7, 4])
    model(ids, attention_mask=mask)  # training / reference forward: padded rows, additive mask
    cache = KVCache(model.config, 2, 9)
    model(ids, attention_mask=mask, kv_cache=cache, cache_position=torch.arange(7))  # prefill
    assert len(calls) == 2 * model.config.num_hidden_layers
    assert {c[:6] for c in calls} == {(5, 1, 1, True, False, True)}

    g = torch.Generator().manual_seed(0)
    B, H, H_kv, T, D = 2, 6, 2, 5, 8
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, H_kv, H_kv))
    visible = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T).clone()
    visible[0, :, :, :2] = False  # row 0 left-padded by 2 columns
    visible[0, :, :2, :2] = torch.eye(2, dtype=torch.bool)  # a padding query sees itself
    bias = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    for m, causal in ((bias, False), (None, True)):
        out = attention(q, k, v, m)
        assert calls[-1][:6] == (H, H_kv, H_kv, m is not None, causal, True)
        torch.testing.assert_close(out.double(), grouped_attention_reference(q, k, v, m), atol=1e-6, rtol=0)
        half = attention(*(t.bfloat16() for t in (q, k, v)), None if m is None else m.bfloat16())
        assert calls[-1][:6] == (H, H_kv, H_kv, m is not None, causal, True)
        torch.testing.assert_close(half.double(), grouped_attention_reference(q, k, v, m), atol=3e-2, rtol=0)


def test_kv_cache_select_rows_shares_a_prefix():
    """Prefill 2 prompts once, repeat row 0 twice, continue each row differently: equals full forwards."""
    model = tiny_model(tie=True)
    prompts, mask = left_padded([5, 3], seed=3)
    rows = torch.tensor([0, 0, 1])
    cont = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(4))
    ids = torch.cat([prompts[rows], cont], dim=1)
    full_mask = torch.cat([mask[rows], torch.ones_like(cont)], dim=1)
    P, T = prompts.shape[1], ids.shape[1]
    with torch.no_grad():
        cache = KVCache(model.config, batch_size=2, max_len=T)
        model(prompts, attention_mask=torch.cat([mask, torch.ones(2, T - P, dtype=mask.dtype)], 1), kv_cache=cache,
              cache_position=torch.arange(P))
        cache.select_rows(rows)
        assert cache.batch_size == 3 and cache.max_len == T
        for t in range(P, T):
            step = model(ids[:, t : t + 1], attention_mask=full_mask, kv_cache=cache, cache_position=torch.tensor([t]))
            expected = model(ids[:, : t + 1], attention_mask=full_mask[:, : t + 1])[:, -1:]
            torch.testing.assert_close(step, expected, atol=1e-5, rtol=1e-5)


def test_kv_cache_compaction_holds_one_buffer_twice_at_most():
    """Dropping one finished row (the worst case: the new cache is almost as large as the old) and growing the
    cache by columns peak at the cache plus one layer's K or V, not at 1.5x the cache."""
    from torch.distributed._tools.mem_tracker import MemTracker

    config = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2)
    for change in (lambda c: c.select_rows(torch.arange(7)), lambda c: c.grow(32)):
        cache = KVCache(config, batch_size=8, max_len=256)
        size, layer = sum(t.nbytes for t in cache.k + cache.v), cache.k[0].nbytes
        tracker = MemTracker()
        tracker.track_external(*cache.k, *cache.v)
        with tracker:
            change(cache)
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
        size = max(size, sum(t.nbytes for t in cache.k + cache.v))  # the larger of the old and new caches
        assert peak <= size + 1.3 * layer, (peak / size, layer / size)
    assert cache.batch_size == 8 and cache.max_len == 288


def test_kv_cache_needs_attention_mask():
    model = tiny_model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=KVCache(model.config, 1, 4))


def grads(model: Qwen2) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def test_gradient_checkpointing_same_grads():
    model = tiny_model(tie=True)
    ids, mask = left_padded([10, 6], seed=5)
    weights = torch.randn(2, 10, ROWS, generator=torch.Generator().manual_seed(6))
    results = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        loss = (model(ids, attention_mask=mask) * weights).sum()
        loss.backward()
        results.append((loss.detach(), grads(model)))
    (loss_plain, g_plain), (loss_ckpt, g_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=0, rtol=0)
    assert g_plain.keys() == g_ckpt.keys()
    for name in g_plain:
        assert g_plain[name].abs().sum() > 0, name
        torch.testing.assert_close(g_ckpt[name], g_plain[name], atol=1e-6, rtol=1e-6, msg=name)


def reference_logprobs(model, ids, mask, start, temperature, vocab_size):
    """log_softmax of the full [B, T, V] logits, taken at the next tokens, and the entropy there."""
    logits = model(ids, attention_mask=mask)[:, start:-1, :vocab_size].float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, ids[:, start + 1 :, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("vocab_size", [None, VOCAB], ids=["all_rows", "padded_vocab"])
def test_token_logprobs_equal_full_log_softmax_with_grads(vocab_size):
    """Chunked (chunk 7 over 2 x 11 positions: 4 chunks, the last partial) vs the full log-softmax: values, entropy
    and the gradients of a loss on both."""
    model = tiny_model(tie=True)
    ids, mask = left_padded([14, 9], seed=7)
    start, tau = 2, 0.7
    w_logp, w_ent = torch.randn(2, 2, 11, generator=torch.Generator().manual_seed(8))
    logp, entropy = model.token_logprobs(ids, mask, start=start, temperature=tau, with_entropy=True,
                                         vocab_size=vocab_size, chunk_size=7)
    ((logp * w_logp).sum() + (entropy * w_ent).sum()).backward()
    g_chunked = grads(model)
    ref_logp, ref_entropy = reference_logprobs(model, ids, mask, start, tau, vocab_size or ROWS)
    ((ref_logp * w_logp).sum() + (ref_entropy * w_ent).sum()).backward()
    g_ref = grads(model)
    assert logp.shape == entropy.shape == (2, ids.shape[1] - start - 1) and logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=0)
    for name in g_ref:  # fp32 sums in a different order: equal up to ~1e-6 of the gradient's scale
        scale = g_ref[name].abs().max().item()
        assert scale > 0 and (g_chunked[name] - g_ref[name]).abs().max().item() <= 1e-5 * scale, name


def test_token_logprobs_without_grad_or_entropy():
    model = tiny_model()
    ids, mask = left_padded([8, 8], seed=9)
    with torch.no_grad():
        logp, entropy = model.token_logprobs(ids, mask, chunk_size=3)
        ref, _ = reference_logprobs(model, ids, mask, 0, 1.0, ROWS)
    assert entropy is None
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)


def test_padded_vocab_rows_are_masked():
    """Head rows >= vocab_size cannot change the log-probs, however large their logits."""
    model = tiny_model(tie=False)
    ids, mask = left_padded([10, 5], seed=10)
    with torch.no_grad():
        before, _ = model.token_logprobs(ids, mask, vocab_size=VOCAB)
        model.lm_head.weight[VOCAB:] = 30 * torch.randn(ROWS - VOCAB, 40, generator=torch.Generator().manual_seed(11))
        after, _ = model.token_logprobs(ids, mask, vocab_size=VOCAB)
        unmasked, _ = model.token_logprobs(ids, mask)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert (unmasked - before).abs().max() > 1  # without the mask those rows would matter
    assert before.shape == (2, 9)


def test_config_hf_round_trip_and_gqa_check():
    cfg = tiny_model().config
    assert config_from_hf(config_to_hf(cfg)) == cfg
    with pytest.raises(ValueError, match="num_attention_heads=5 must be a multiple of num_key_value_heads=2"):
        ModelConfig(hidden_size=40, num_attention_heads=5, num_key_value_heads=2)
