"""Run under torchrun (see test_train.py): one GRPO optimisation step on 2 ranks x 2 micro-batches with FSDP2/gloo,
unshared and with shared-prefix micro-batches (one group of G = 4 per micro-batch, activation checkpointing on).

Writes to the file given as argv[1] (rank 0): for each loss mode and each `grad_accum_no_sync` setting the full
gradients and updated parameters, and, for each setting, the bytes of unsharded gradient FSDP2 holds once
micro-batch 0's backward is done (bf16 compute, fp32 reduce, as configs/grpo_7b.py runs).
"""

import contextlib
import os
import sys

import torch
from torch.distributed.fsdp import FSDPModule

from sqlr1 import distributed
from sqlr1.distributed import Models
from sqlr1.grpo import loss_norm
from sqlr1.update import accumulate_gradients, grpo_objective, microbatches
from tests.split_case import LOSS_MODES, SYNC_SHARED, VOCAB, make_case, one_step


def unsharded_grad_bytes(model) -> int:
    """Bytes of unsharded gradient held by FSDP2 (per FSDPParam: the unsharded parameter's .grad and the
    reduce-dtype accumulation buffer), i.e. what survives between micro-batches beyond the sharded .grad."""
    total = 0
    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        for fp in group.fsdp_params if group is not None else ():
            unsharded = getattr(fp, "_unsharded_param", None)  # created at the first all-gather
            for g in (None if unsharded is None else unsharded.grad, fp.unsharded_accumulated_grad):
                total += 0 if g is None else g.numel() * g.element_size()
    return total


class ProbeAfterFirst(list):
    """The step's micro-batches; when the loop asks for the second one (micro-batch 0's backward is done) it
    records `unsharded_grad_bytes` of the model."""

    def __init__(self, items, model):
        super().__init__(items)
        self.model, self.held = model, None

    def __iter__(self):
        for i, mb in enumerate(list.__iter__(self)):
            if i == 1:
                self.held = unsharded_grad_bytes(self.model)
            yield mb


def held_after_first_micro_batch(no_sync: bool, d) -> tuple[int, int, bool]:
    """(unsharded gradient bytes after micro-batch 0, the full fp32 model's bytes, .grad is a sharded DTensor)."""
    model, seqs, cfg = make_case()
    cfg.grad_accum_no_sync = no_sync
    full_bytes = sum(p.numel() * 4 for p in model.parameters())
    distributed.shard(model, torch.bfloat16)
    per_rank = len(seqs) // d.world_size
    mbs = microbatches(seqs[d.rank * per_rank : (d.rank + 1) * per_rank], 4, 0, d.device)
    norm = loss_norm([mb.mask for mb in mbs], cfg.max_response_len, world_reduce=distributed.all_reduce)
    for mb in mbs:  # pi_old: the given log-probs
        mb.old_logp = mb.sampler_logp
    mbs = ProbeAfterFirst(mbs, model)
    accumulate_gradients(Models(model, None, model, contextlib.nullcontext()), mbs, grpo_objective(cfg, norm, {}),
                         cfg.temperature, True, VOCAB, cfg, d)
    sharded = all(hasattr(p.grad, "full_tensor") and p.grad.to_local().numel() < p.numel() for p in model.parameters()
                  if p.numel() >= d.world_size)
    return mbs.held, full_bytes, sharded


def main(out: str) -> None:
    d = distributed.setup("cpu")
    results = {}
    for no_sync, shared in SYNC_SHARED:
        for mode in LOSS_MODES:
            model, seqs, cfg = make_case(mode, shared)
            cfg.grad_accum_no_sync = no_sync
            model.gradient_checkpointing = shared  # as the 7B config: FSDP re-gathers inside the recomputed blocks
            distributed.shard(model, torch.float32)
            per_rank = len(seqs) // d.world_size  # whole groups per rank
            mine = seqs[d.rank * per_rank : (d.rank + 1) * per_rank]
            results[mode, no_sync, shared] = one_step(model, mine, cfg, d, micro_batch_size=4)  # 2 micro-batches
    for no_sync in (False, True):
        results["held", no_sync] = held_after_first_micro_batch(no_sync, d)
    if d.is_main:
        torch.save(results, out)
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
    # Skip interpreter teardown: gloo's background threads occasionally abort in static destructors at exit
    # ("terminate called without an active exception") after all work is done and the group is destroyed.
    os._exit(0)
