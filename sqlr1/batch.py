"""Training sequences and padded micro-batches (shared by SFT and GRPO).

A sequence is prompt ids + completion ids. In a micro-batch prompts are LEFT-padded to the longest prompt P and
completions RIGHT-padded to the longest completion C:

    [pad pad p p p p | c c c c pad]        input_ids      [B, P + C]
    [ 0   0  1 1 1 1 | 1 1 1 1  0 ]        attention_mask [B, P + C]
                     | 1 1 1 1  0 ]        mask           [B, C]  (explicit completion mask — never `ids != pad`,
                                                                    because for base models pad == EOS)

so every completion starts at column P and `model.token_logprobs(input_ids, attention_mask, start=P-1)` returns
log-probs aligned with `mask`. Multi-turn completions (sqlr1/sql_env.py) interleave model tokens and observations:
the observations stay in input_ids (the policy conditions on them) but `Sequence.loss_mask` zeroes them in `mask`,
so they get no loss, no gradient and no place in the token-mean denominator (`grpo.loss_norm` counts `mask`). Sequences are sorted by length before splitting so padding stays small.

Shared-prefix micro-batches (`shared=True`, GRPO): the G completions of a prompt carry its `Sequence.group` id and
a micro-batch holds whole groups (as many as fit in `micro_batch_size` rows), so `model.shared_prefix_logprobs`
computes each prompt once per micro-batch. A group larger than `micro_batch_size` is cut into micro-batches of its
own, each recomputing the prompt: memory stays bounded by `micro_batch_size` rows, as unshared, and the 7B setting
(few rows per micro-batch, G = 8) still saves a factor micro_batch_size on the prompt. The layout is unchanged;
`MicroBatch.group` [B] names each row's group (0..M-1) and is None for unshared micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sequence:
    prompt: list[int]
    completion: list[int]
    old_logp: list[float] | None = None  # log pi_old of each completion token (GRPO; None for SFT)
    advantage: float = 0.0
    weight: float = 1.0  # 0 marks a filler sequence that only keeps ranks in step (contributes nothing)
    sampler_logp: list[float] | None = None  # the rollout engine's log-prob of each token (kept for TIS, mismatch)
    group: int = -1  # rows with the same id share their prompt (GRPO: the prompt's index); -1: no group
    loss_mask: list[float] | None = None  # per completion token: 1 sampled by the policy, 0 an observation (None: all 1)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, P + C]
    attention_mask: torch.Tensor  # [B, P + C]
    start: int  # P - 1
    mask: torch.Tensor  # [B, C] float: 1 on completion tokens that count
    old_logp: torch.Tensor  # [B, C]
    advantages: torch.Tensor  # [B]
    ref_logp: torch.Tensor | None = None
    sampler_logp: torch.Tensor | None = None  # [B, C], when the sequences carry it
    group: torch.Tensor | None = None  # [B] prompt group 0..M-1 of each row (shared-prefix forward); None: unshared

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(seqs: list[Sequence], pad_id: int, device: torch.device | str = "cpu", shared: bool = False) -> MicroBatch:
    """Pad a list of sequences into one micro-batch (layout in the module docstring); `shared` also numbers the
    rows' groups for the shared-prefix forward (rows of one group must hold the same prompt)."""
    P = max(len(s.prompt) for s in seqs)
    C = max(len(s.completion) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros(B, P + C, dtype=torch.long)
    mask = torch.zeros(B, C)
    old = torch.zeros(B, C)
    sampler = torch.zeros(B, C) if any(s.sampler_logp is not None for s in seqs) else None
    for i, s in enumerate(seqs):
        lp, lc = len(s.prompt), len(s.completion)
        ids[i, P - lp : P] = torch.tensor(s.prompt)
        ids[i, P : P + lc] = torch.tensor(s.completion)
        attn[i, P - lp : P + lc] = 1
        mask[i, :lc] = s.weight if s.loss_mask is None else s.weight * torch.tensor(s.loss_mask)
        if s.old_logp is not None:
            old[i, :lc] = torch.tensor(s.old_logp)
        if s.sampler_logp is not None:
            sampler[i, :lc] = torch.tensor(s.sampler_logp)
    adv = torch.tensor([s.advantage for s in seqs])
    mb = MicroBatch(ids.to(device), attn.to(device), P - 1, mask.to(device), old.to(device), adv.to(device),
                    sampler_logp=None if sampler is None else sampler.to(device))
    if shared:
        mb.group = torch.tensor(_group_numbers(seqs), device=device)
    return mb


def _group_numbers(seqs: list[Sequence]) -> list[int]:
    """Sequence.group ids renumbered 0..M-1 in order of first appearance; checks each group holds one prompt."""
    number, prompt = {}, {}
    for s in seqs:
        if s.group < 0:
            raise ValueError("shared-prefix micro-batch: every Sequence needs its prompt's group id (Sequence.group)")
        if prompt.setdefault(s.group, s.prompt) != s.prompt:
            raise ValueError(f"shared-prefix micro-batch: group {s.group} holds two different prompts; give each "
                             "prompt its own Sequence.group id")
        number.setdefault(s.group, len(number))
    return [number[s.group] for s in seqs]


def split_micro_batches(seqs: list[Sequence], micro_batch_size: int, num_micro: int | None = None,
                        shared: bool = False) -> list[list[Sequence]]:
    """Sort by total length and cut into micro-batches of at most `micro_batch_size` sequences; with `shared`,
    whole groups (sorted by prompt + longest completion) are packed instead, a group over `micro_batch_size` rows
    cut into micro-batches of its own (module docstring).

    `num_micro` forces an exact count (every rank must run the same number of FSDP forward/backward passes): missing
    micro-batches are filled with a zero-weight copy of a real sequence, which adds nothing to loss or gradient.
    """
    if not seqs:
        raise ValueError("no sequences to train on")
    if shared:
        chunks = _pack_groups(seqs, micro_batch_size)
        order = chunks[0]
    else:
        order = sorted(seqs, key=lambda s: len(s.prompt) + len(s.completion))
        chunks = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    if num_micro is not None:
        if num_micro < len(chunks):
            raise ValueError(f"num_micro={num_micro} < {len(chunks)} micro-batches needed")
        filler = Sequence(order[0].prompt, order[0].completion, order[0].old_logp, 0.0, weight=0.0,
                          sampler_logp=order[0].sampler_logp, group=order[0].group, loss_mask=order[0].loss_mask)
        chunks += [[filler] for _ in range(num_micro - len(chunks))]
    return chunks


def _pack_groups(seqs: list[Sequence], micro_batch_size: int) -> list[list[Sequence]]:
    """Whole groups per micro-batch, greedily in length order; a group over micro_batch_size rows is cut alone."""
    groups: dict[int, list[Sequence]] = {}
    for s in seqs:
        groups.setdefault(s.group, []).append(s)
    order = sorted(groups.values(), key=lambda g: len(g[0].prompt) + max(len(s.completion) for s in g))
    chunks, current = [], []
    for g in order:
        if len(g) > micro_batch_size:
            chunks += [g[i : i + micro_batch_size] for i in range(0, len(g), micro_batch_size)]
            continue
        if len(current) + len(g) > micro_batch_size:
            chunks.append(current)
            current = []
        current += g
    return chunks + [current] if current else chunks
