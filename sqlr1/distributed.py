"""torch.distributed plumbing for train.py: torchrun environment, FSDP2 sharding, weight gathering.

One process (`python train.py`) and many (`torchrun --nproc_per_node=8 train.py`, or multi-node via torchrun's
rendezvous) run the same code. With WORLD_SIZE > 1 the policy is sharded with FSDP2 `fully_shard` per decoder
block plus the root (embeddings, final norm, head); master weights stay fp32 and compute runs in `compute_dtype`
through FSDP's MixedPrecisionPolicy. Rollouts use a separate full (unsharded) copy of the weights in
`compute_dtype` on every rank, refreshed from the policy before each step's rollouts (`copy_full_weights`): one
all-gather of the model per step, and one extra model copy of memory per GPU (15 GB for 7B in bf16).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from sqlr1.model import Qwen2


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; init the process group when world_size > 1: gloo on CPU;
    on GPU NCCL for CUDA tensors (FSDP) plus gloo for the CPU tensors train.py reduces (token counts, metrics)."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        cuda = dev.type == "cuda"
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", device_id=dev if cuda else None)
    return Dist(rank, world, local, dev)


def cleanup() -> None:
    """Tear down the process group once every rank is done (a rank leaving early can abort gloo peers)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(model: Qwen2, compute_dtype: torch.dtype, trainable: bool = True) -> Qwen2:
    """FSDP2: shard each decoder block, then the root; register the log-prob methods (and the blocks' shared-prefix
    forward) as forward methods, so FSDP gathers the weights around them as around forward."""
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
        register_fsdp_forward_method(block, "forward_shared")
    fully_shard(model, mp_policy=mp)
    register_fsdp_forward_method(model, "token_logprobs")
    register_fsdp_forward_method(model, "shared_prefix_logprobs")
    if not trainable:
        model.requires_grad_(False)
    return model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters (a collective with FSDP: every rank must call it). Tied weights appear once."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.full_tensor() if isinstance(p, DTensor) else p.detach()
    return out


@torch.no_grad()
def copy_full_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """dst <- src, gathering shards first when src is FSDP-sharded (the rollout copy is refreshed every step)."""
    dst_params = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        dst_params[name].copy_(p.full_tensor() if isinstance(p, DTensor) else p)


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) a tensor over ranks; identity in a single process."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
