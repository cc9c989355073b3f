"""Training sequences -> padded micro-batches with an explicit completion mask (SFT and GRPO alike).

Prompts are LEFT-padded to the longest prompt P, completions RIGHT-padded to the longest completion C:

    [pad pad p p p p | c c c c pad]        input_ids      [B, P + C]
    [ 0   0  1 1 1 1 | 1 1 1 1  0 ]        attention_mask [B, P + C]
                     | 1 1 1 1  0 ]        mask           [B, C]   (never `ids != pad`: for base models pad == EOS)

so every completion starts at column P and `model.token_logprobs(input_ids, attention_mask, start=P-1)` is aligned
with `mask`. A sequence's `loss_mask` zeroes tokens that stay in the input but get no loss (multi-turn
observations) and `weight` scales its whole row (0: a filler that only keeps ranks in step). Sequences are sorted by
length before splitting, so padding stays small. Shared-prefix micro-batches (GRPO) hold whole groups (the G
completions of a prompt, `group`) so that `model.shared_prefix_logprobs` computes each prompt once; a group larger
than the micro-batch is cut into micro-batches of its own, each recomputing its prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class TrainSequence:
    prompt: list[int]
    completion: list[int]
    loss_mask: list[float] | None = None  # per completion token: 1 the model's own, 0 an observation (None: all 1)
    advantage: float = 0.0  # GRPO's A_i (SFT: unused)
    weight: float = 1.0  # scales the row's mask: 0 for a filler that contributes nothing
    sampler_logp: list[float] | None = None  # the rollout engine's log-prob of each token (GRPO)
    group: int = -1  # rows with the same id share their prompt (GRPO: the prompt's index); -1: no group


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, P + C]
    attention_mask: torch.Tensor  # [B, P + C]
    start: int  # P - 1
    mask: torch.Tensor  # [B, C] float: weight x loss mask on completion tokens, 0 elsewhere
    advantages: torch.Tensor  # [B]
    sampler_logp: torch.Tensor | None = None  # [B, C], when the sequences carry it
    group: torch.Tensor | None = None  # [B] group 0..M-1 of each row (shared-prefix forward); None: unshared
    old_logp: torch.Tensor | None = None  # [B, C] log pi_old, set by the update
    ref_logp: torch.Tensor | None = None  # [B, C] log pi_ref, set by the update

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def filler(seq: TrainSequence) -> TrainSequence:
    """A copy of `seq` that contributes nothing (weight 0): what keeps a rank's micro-batch count (FSDP's collectives)
    equal to the others' when it has less to train on."""
    return replace(seq, weight=0.0, advantage=0.0)


def collate(seqs: list[TrainSequence], pad_id: int, device: torch.device | str = "cpu",
            shared: bool = False) -> MicroBatch:
    """Pad sequences into one micro-batch (layout in the module docstring); `shared` numbers the rows' groups."""
    P = max(len(s.prompt) for s in seqs)
    C = max(len(s.completion) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros(B, P + C, dtype=torch.long)
    mask = torch.zeros(B, C)
    sampler = torch.zeros(B, C) if any(s.sampler_logp is not None for s in seqs) else None
    for i, s in enumerate(seqs):
        lp, lc = len(s.prompt), len(s.completion)
        ids[i, P - lp : P] = torch.tensor(s.prompt)
        ids[i, P : P + lc] = torch.tensor(s.completion)
        attn[i, P - lp : P + lc] = 1
        mask[i, :lc] = s.weight if s.loss_mask is None else s.weight * torch.tensor(s.loss_mask)
        if s.sampler_logp is not None:
            sampler[i, :lc] = torch.tensor(s.sampler_logp)
    return MicroBatch(ids.to(device), attn.to(device), P - 1, mask.to(device),
                      torch.tensor([s.advantage for s in seqs]).to(device),
                      sampler_logp=None if sampler is None else sampler.to(device),
                      group=torch.tensor(_group_numbers(seqs), device=device) if shared else None)


def _group_numbers(seqs: list[TrainSequence]) -> list[int]:
    """TrainSequence.group ids renumbered 0..M-1 in order of first appearance; checks each group holds one prompt."""
    number, prompt = {}, {}
    for s in seqs:
        if s.group < 0:
            raise ValueError("shared-prefix micro-batch: every sequence needs its prompt's group id (.group)")
        if prompt.setdefault(s.group, s.prompt) != s.prompt:
            raise ValueError(f"shared-prefix micro-batch: group {s.group} holds two different prompts; give each "
                             "prompt its own group id")
        number.setdefault(s.group, len(number))
    return [number[s.group] for s in seqs]


def split_micro_batches(seqs: list[TrainSequence], micro_batch_size: int, num_micro: int | None = None,
                        shared: bool = False) -> list[list[TrainSequence]]:
    """Sort by total length and cut into micro-batches of at most `micro_batch_size` sequences, or with `shared`
    pack whole groups (module docstring). `num_micro` forces an exact count, the missing micro-batches each one
    `filler` (every rank must run the same number of FSDP forward/backward passes)."""
    if not seqs:
        raise ValueError("no sequences to train on")
    if shared:
        chunks = _pack_groups(seqs, micro_batch_size)
        first = chunks[0][0]
    else:
        order = sorted(seqs, key=lambda s: len(s.prompt) + len(s.completion))
        chunks = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
        first = order[0]
    if num_micro is not None:
        if num_micro < len(chunks):
            raise ValueError(f"num_micro={num_micro} < {len(chunks)} micro-batches needed")
        chunks += [[filler(first)] for _ in range(num_micro - len(chunks))]
    return chunks


def _pack_groups(seqs: list[TrainSequence], micro_batch_size: int) -> list[list[TrainSequence]]:
    """Whole groups per micro-batch, greedily in length order; a group over micro_batch_size rows is cut alone."""
    groups: dict[int, list[TrainSequence]] = {}
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
