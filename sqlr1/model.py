"""Qwen2 / Qwen2.5 decoder-only Transformer in plain PyTorch.

    x_0 = E[ids]
    for each block l:   x = x + Attn_l(RMSNorm(x))        (GQA, RoPE, q/k/v bias, no o bias)
                        x = x + MLP_l(RMSNorm(x))         (SwiGLU: W_down(silu(W_gate x) * W_up x))
    logits = W_head RMSNorm(x)                            (W_head = E when tie_word_embeddings)

Parameter names are the Hugging Face checkpoint's without the leading "model." (checkpoint.py loads by name);
RoPE uses HF's rotate-half layout. What the rest of the code needs from the model: a static `KVCache` the sampler
owns ([B, H_kv, T_max, D] per layer, written at columns `cache_position`); `token_logprobs`, log pi(y_t | y_<t) of
given tokens in chunks, so the [B, T, V] fp32 log-softmax is never materialised (V = 152k); and
`shared_prefix_logprobs`, the same for GRPO's G completions of a prompt with the prompt computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    """The subset of a Qwen2 `config.json` that defines the network (defaults: Qwen2.5-0.5B)."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )


class KVCache:
    """Static, preallocated keys and values: one [B, H_kv, T_max, D] buffer pair per layer.

    The model writes the keys/values of the tokens it processes at cache columns `cache_position` (shared by all
    rows) and attends over the first S columns under the caller's `attention_mask` [B, S], S <= T_max (the sampler
    passes only the filled columns). Nothing is reallocated while decoding; `select_rows` builds the smaller cache
    used when finished rows are dropped. A decode step (one new token per row) uses `decode_attention`.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, cache_position: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, H_kv, T, D] at columns cache_position [T]; return the layer's full buffers."""
        self.k[layer].index_copy_(2, cache_position, k)
        self.v[layer].index_copy_(2, cache_position, v)
        return self.k[layer], self.v[layer]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) batch rows `rows` [B'] — used for prefix sharing and for dropping finished rows.

        Buffer by buffer, each old one freed as its replacement is made: the cache is never held twice, only one
        layer's K or V is (the peak a compaction adds is 1 / (2 n_layers) of the cache, not half of it)."""
        for buffers in (self.k, self.v):
            for i in range(len(buffers)):
                buffers[i] = buffers[i].index_select(0, rows)

    def grow(self, columns: int) -> None:
        """Append `columns` empty columns to every buffer (multi-turn observations), buffer by buffer as above."""
        for buffers in (self.k, self.v):
            for i in range(len(buffers)):
                B, H, T, D = buffers[i].shape
                grown = buffers[i].new_zeros(B, H, T + columns, D)
                grown[:, :, :T] = buffers[i]
                buffers[i] = grown


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 as in the reference implementation."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [B, T, D] for angles pos * theta^(-2i/D), duplicated over both halves (rotate-half layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated: x*cos + rotate_half(x)*sin, rotate_half([a, b]) = [-b, a]."""
    a, b = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-b, a), dim=-1) * sin[:, None]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q K^T / sqrt(D) + bias) V for ONE query per row (a decode step), q [B, H, 1, D], k/v [B, H_kv, S, D],
    bias [B, 1, 1, S] additive (0 visible, -inf hidden). GQA without repeating K/V: the H / H_kv query heads that
    share a KV head are stacked as rows of one [H / H_kv, D] @ [D, S] product. Softmax in fp32, as SDPA does. Two
    plain batched matmuls: SDPA's flash kernel is built for long query blocks and costs several times more than this
    for a single query (CPU)."""
    B, H, _, D = q.shape
    n_kv = k.shape[1]
    scores = (q.view(B, n_kv, H // n_kv, D) * D**-0.5) @ k.transpose(-1, -2)  # [B, H_kv, H / H_kv, S]
    probs = (scores.float() + bias).softmax(-1).to(v.dtype)
    return (probs @ v).view(B, H, 1, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q K^T / sqrt(D) + mask) V for a block of queries: q [B, H, T, D], k/v [B, H_kv, S, D], mask [B, 1, T, S]
    additive, or None for plain causal attention over unpadded rows.

    The kernel is chosen here because on CUDA the wrong one costs an fp32 [B, H, T, S] score tensor per layer call
    (15.8 GiB at 4 x 6144 tokens x 28 heads): the math kernel is switched off there (`sdpa_kernel`), so a call no
    fused kernel takes raises instead. GQA: K/V go in with their H_kv heads (`enable_gqa`) wherever the kernel takes
    them so: on CPU always; on CUDA when torch reports a fused kernel for the call (flash unmasked in fp16/bf16; the
    memory-efficient or cuDNN kernel with a mask, in torch builds whose kernels support GQA). Otherwise they are
    repeated to H heads, K~_h = K_{h // (H / H_kv)}: 2 x [B, H, S, D] alive while the kernel runs (saved for
    backward under autograd) — what the dry run assumes for masked calls on CUDA, an upper bound.
    """
    if k.shape[1] != q.shape[1] and q.is_cuda and not _fused_gqa(q, k, v, mask):
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    args = dict(attn_mask=mask, is_causal=mask is None, enable_gqa=k.shape[1] != q.shape[1])
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, **args)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, **args)


def _fused_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether a fused CUDA kernel takes this call with K/V at H_kv heads (torch's own kernel checks)."""
    params = torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, mask is None, True)
    return any(can(params, False) for can in (torch.backends.cuda.can_use_flash_attention,
                                              torch.backends.cuda.can_use_efficient_attention,
                                              torch.backends.cuda.can_use_cudnn_attention))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv, self.head_dim = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def qkv(self, x, cos, sin):
        """q [B, H, T, D], k / v [B, H_kv, T, D] of x [B, T, hidden], RoPE applied to q and k."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None, cache_position):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, cache_position, k, v)
            if mask is not None:  # attend over the first S columns only: the caller's mask may be narrower
                k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        if T == 1 and kv_cache is not None:
            y = decode_attention(q, k, v, mask)
        else:
            y = attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def forward_shared(self, xp, xc, rope_p, rope_c, mask_p, mask_c, group):
        """Shared-prefix attention (see `Qwen2.shared_prefix_logprobs`): prefixes xp [M, P, hidden] attend causally
        to themselves; completions xc [N, C, hidden] attend to their group's prefix keys, gathered per row by `group`
        [N] (backward sums the G rows' key/value gradients into the prefix), and to their own causal past."""
        qp, kp, vp = self.qkv(xp, *rope_p)
        qc, kc, vc = self.qkv(xc, *rope_c)
        yp = attention(qp, kp, vp, mask_p)
        k = torch.cat((kp.index_select(0, group), kc), dim=2)  # [N, H_kv, P + C, D]
        v = torch.cat((vp.index_select(0, group), vc), dim=2)
        yc = attention(qc, k, v, mask_c)
        return self.o_proj(yp.transpose(1, 2).flatten(2)), self.o_proj(yc.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv_cache=None, cache_position=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, cache_position)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_shared(self, xp, xc, rope_p, rope_c, mask_p, mask_c, group):
        """One block over prefixes xp [M, P, hidden] and completions xc [N, C, hidden] (Attention.forward_shared)."""
        ap, ac = self.self_attn.forward_shared(
            self.input_layernorm(xp), self.input_layernorm(xc), rope_p, rope_c, mask_p, mask_c, group
        )
        xp, xc = xp + ap, xc + ac
        return xp + self.mlp(self.post_attention_layernorm(xp)), xc + self.mlp(self.post_attention_layernorm(xc))


class Qwen2(nn.Module):
    """Qwen2 causal LM. Parameter names = HF names without the "model." prefix."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False  # recompute each block in backward (activation checkpointing)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init (normal(0, std) matrices, zero biases, unit norms) for models trained from scratch."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=generator)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden].

        input_ids [B, T]: the new tokens. attention_mask: 1 for real tokens, 0 for padding, over the keys —
        [B, T] without a cache, [B, S] over the first S <= T_max cache columns with one. cache_position [T]: the
        key columns the new tokens occupy (default 0..T-1). position_ids [B, T] (default: number of real tokens before each one,
        which makes left padding invisible to RoPE).
        """
        B, T = input_ids.shape
        device = input_ids.device
        if cache_position is None:
            cache_position = torch.arange(T, device=device)
        if kv_cache is not None and attention_mask is None:
            raise ValueError("attention_mask [B, T_max] is required when decoding with a kv_cache")
        if position_ids is None:
            if attention_mask is None:
                position_ids = cache_position.expand(B, T)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, cache_position]
        x = self.embed_tokens(input_ids)
        mask = None
        if attention_mask is not None:
            keys = torch.arange(attention_mask.shape[1], device=device)
            causal = keys[None, :] <= cache_position[:, None]  # [T, S]
            visible = causal[None] & attention_mask.bool()[:, None, :]  # [B, T, S]
            # A padding query sees no real key; let it see itself so its (ignored) output stays finite.
            visible = visible | (keys[None, :] == cache_position[:, None])[None]
            # Additive form, built once for all layers: 0 where visible, -inf elsewhere; [B, 1, T, S] over heads.
            mask = _additive(visible, x.dtype)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, kv_cache, cache_position, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache, cache_position)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] (in the weights' dtype). See `hidden_states` for the arguments."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, kv_cache, cache_position))

    def token_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        start: int = 0,
        temperature: float = 1.0,
        with_entropy: bool = False,
        vocab_size: int | None = None,
        chunk_size: int = 1024,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log pi(y_t | y_<t) for the tokens input_ids[:, start+1:], and optionally the policy entropy there.

        Returns logp [B, T-start-1] (fp32) and entropy H_t = -sum_v p_v log p_v [B, T-start-1] (or None), with
        p = softmax(logits[:vocab_size] / temperature) so that scores match what the sampler drew from (ids past the
        tokenizer's real `vocab_size` — Qwen's padded embedding rows — are excluded). Prompt positions before
        `start` get no head computation. Rows are processed in chunks of `chunk_size` positions; with gradients on,
        each chunk is recomputed in backward, so at most one [chunk, V] fp32 block of logits is alive at a time.
        """
        h = self.hidden_states(input_ids, attention_mask)[:, start:-1]
        return head_logprobs(h, self.lm_head.weight[:vocab_size], input_ids[:, start + 1 :], temperature,
                             with_entropy, chunk_size)

    def shared_prefix_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        start: int,
        group: torch.Tensor,
        temperature: float = 1.0,
        with_entropy: bool = False,
        vocab_size: int | None = None,
        chunk_size: int = 1024,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`token_logprobs(input_ids, attention_mask, start)` for rows that share prompts, each prompt computed once.

        Layout as in batch.py (prompts left-padded to P = start + 1 columns, completions from column P); group [B]
        names each row's prompt (equal groups, equal prompts). With M prompts q_g and completions o_i of group g(i),
        every block runs the prefixes x_g [M, P] causally over themselves and the completions x_i,t [N, C] over
        [K_g(i) ; K_i,<=t], with RoPE positions L_g(i) + t; the head reads h_i,0 = x_g(i),P-1 and h_i,t = x_i,t-1.
        That is log pi(o_i,t | q, o_i,<t) exactly as the unshared forward computes it, and backward sums the G
        completions' gradients into one prefix computation (the prefix K/V are index_selected per row). Cost, N = M G
        rows: M P + N C tokens through the weights instead of N (P + C); attention [C, P + C] per completion instead
        of a block-masked row of P + G C (which no fused causal kernel could take).
        """
        P = start + 1
        device = input_ids.device
        rows = torch.arange(len(group), device=device)
        first = torch.full((int(group.max()) + 1,), len(group), device=device).scatter_reduce(0, group, rows, "amin")
        prefix_ids, prefix_mask = input_ids[first, :P], attention_mask[first, :P]
        comp_ids = input_ids[:, P:]
        C = comp_ids.shape[1]
        xp, xc = self.embed_tokens(prefix_ids), self.embed_tokens(comp_ids)
        real = prefix_mask.bool()
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        # Prefix rows as in hidden_states: causal over real keys, a padding query sees itself (finite, ignored);
        # without padding (one group per micro-batch, or equal prompt lengths) plain causal: SDPA's fused kernel.
        mask_p = None
        if not bool(real.all()):
            mask_p = _additive((causal & real[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device), xp.dtype)
        # Completion query t: every real key of its prompt, and its own completion columns <= t (right padding
        # comes after every real token, so causality hides it).
        causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
        visible = torch.cat((real[group][:, None, :].expand(-1, C, -1), causal.expand(len(group), -1, -1)), -1)
        mask_c = _additive(visible, xc.dtype)
        pos_p = (prefix_mask.long().cumsum(-1) - 1).clamp(min=0)
        pos_c = prefix_mask.long().sum(-1)[group, None] + torch.arange(C, device=device)
        rope_p = rope_cos_sin(pos_p, self.config.head_dim, self.config.rope_theta, xp.dtype)
        rope_c = rope_cos_sin(pos_c, self.config.head_dim, self.config.rope_theta, xc.dtype)
        for layer in self.layers:
            args = (xp, xc, rope_p, rope_c, mask_p, mask_c, group)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                xp, xc = checkpoint(layer.forward_shared, *args, use_reentrant=False)
            else:
                xp, xc = layer.forward_shared(*args)
        h = torch.cat((self.norm(xp[:, -1:]).index_select(0, group), self.norm(xc[:, :-1])), dim=1)  # [N, C, hidden]
        return head_logprobs(h, self.lm_head.weight[:vocab_size], comp_ids, temperature, with_entropy, chunk_size)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, S] bool visibility -> [B, 1, T, S] additive mask (0 visible, -inf hidden)."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
    return mask[:, None]


def head_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                  with_entropy: bool, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(h W^T / tau)[target] [B, T] (and entropy) for hidden states h [B, T, hidden], in chunks of
    `chunk_size` positions, each recomputed in backward: one [chunk, V] fp32 block of logits alive at a time."""
    B, T, D = h.shape
    h, targets = h.reshape(B * T, D), targets.reshape(B * T)
    logps, ents = [], []
    for i in range(0, B * T, chunk_size):
        args = (h[i : i + chunk_size], weight, targets[i : i + chunk_size], temperature, with_entropy)
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps).view(B, T), torch.cat(ents).view(B, T) if with_entropy else None


def _chunk_logprobs(h, weight, targets, temperature: float, with_entropy: bool):
    """log softmax(h W^T / tau)[target] (and entropy) for one chunk of positions, in fp32."""
    logits = (h @ weight.t()).float() / temperature
    logz = logits.logsumexp(-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    if not with_entropy:
        return logp, logp.new_zeros(0)
    entropy = logz - (logits.softmax(-1) * logits).sum(-1)
    return logp, entropy


def num_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token: 2 * (matmul params) + attention 2 * 2 * L * T * d_attn (causal: half of T^2)."""
    c = config
    attn_dim = c.num_attention_heads * c.head_dim
    kv_dim = c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (attn_dim + 2 * kv_dim) + attn_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    matmul = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size
    return 2 * matmul + 2 * c.num_hidden_layers * seq_len * attn_dim  # causal attention: ~T/2 keys on average
