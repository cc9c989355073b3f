"""Run under torchrun (see test_dryrun.py): refresh a bf16 rollout copy from an fp32 policy sharded with FSDP2 over
2 gloo ranks, counting the bytes every all-gather moves.

Writes to the file given as argv[1] (rank 0): whether the copy equals the policy gathered in fp32 and then cast,
tensor for tensor and bit for bit, the bytes the refresh gathered, and the bytes of the fp32 model.
"""

import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sqlr1 import distributed
from tests.dryrun_case import checkpoint_model


class GatheredBytes(TorchDispatchMode):
    """Sums the input bytes of every all-gather (what a rank sends; each receives world_size times that)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops._c10d_functional.all_gather_into_tensor.default:
            self.bytes += args[0].numel() * args[0].element_size()
        return func(*args, **(kwargs or {}))


def main(out: str) -> None:
    d = distributed.setup("cpu")
    policy, rollout = checkpoint_model(), checkpoint_model().to(torch.bfloat16)
    full_bytes = sum(p.numel() * 4 for p in policy.parameters())
    distributed.shard(policy, torch.bfloat16)
    distributed.free_weights(rollout)
    with GatheredBytes() as counter:
        distributed.copy_full_weights(policy, rollout)
    expected = {name: p.full_tensor().to(torch.bfloat16) for name, p in policy.named_parameters()}
    same = all(torch.equal(expected[name], q) for name, q in rollout.named_parameters())
    if d.is_main:
        with open(out, "w") as f:
            json.dump({"same": same, "gathered": counter.bytes * d.world_size, "full_fp32": full_bytes}, f)
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
    os._exit(0)  # gloo's threads can abort in static destructors at interpreter exit (see dist_split.py)
