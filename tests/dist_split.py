"""Run under torchrun (see test_train.py): one GRPO optimisation step on 2 ranks x 2 micro-batches with FSDP2/gloo,
unshared and with shared-prefix micro-batches (one group of G = 4 per micro-batch, activation checkpointing on).

Writes the full gradients and updated parameters to the file given as argv[1] (rank 0).
"""

import os
import sys

import torch

from sqlr1 import distributed
from tests.split_case import LOSS_MODES, make_case, one_step


def main(out: str) -> None:
    d = distributed.setup("cpu")
    results = {}
    for mode in LOSS_MODES:
        for shared in (False, True):
            model, seqs, cfg = make_case(mode, shared)
            model.gradient_checkpointing = shared  # as the 7B config: FSDP re-gathers inside the recomputed blocks
            distributed.shard(model, torch.float32)
            per_rank = len(seqs) // d.world_size  # whole groups per rank
            mine = seqs[d.rank * per_rank : (d.rank + 1) * per_rank]
            results[mode, shared] = one_step(model, mine, cfg, d, micro_batch_size=4)  # 8 per rank: 2 micro-batches
    if d.is_main:
        torch.save(results, out)
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
    # Skip interpreter teardown: gloo's background threads occasionally abort in static destructors at exit
    # ("terminate called without an active exception") after all work is done and the group is destroyed.
    os._exit(0)
