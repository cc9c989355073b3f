"""torch.distributed for train.py: torchrun's environment, the run's models, FSDP2 sharding, weight copies.

One process (`python train.py`) and many (`torchrun --nproc_per_node=8 train.py`, or multi-node via torchrun's
rendezvous) run the same code. A run holds three copies of the weights (`Models`): the fp32 master policy, sharded
with FSDP2 over ranks (`fully_shard` per decoder block, then the root; compute in the compute dtype through FSDP's
MixedPrecisionPolicy); the frozen reference in the compute dtype, sharded too; and the rollout copy, full and in the
compute dtype on every rank, filled from the policy only while it samples (`rollout_weights`: one all-gather of bf16
shards per use, freed after; kept through the update it would make the update the peak at 7B).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from sqlr1.config import DTYPES, TrainConfig
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


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device `--device=name` asks for (auto: cuda when available, else cpu), checked to exist here.

    train.py and sample.py both call it, so a missing GPU is one sentence, not a traceback from deep in torch.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device={name}: not a device name; use auto, cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device={name}: no CUDA GPU is available on this machine (no GPU or driver, or a "
                             f"CPU-only torch {torch.__version__}); use --device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device={name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered from 0")
    elif dev.type != "cpu":
        raise ValueError(f"--device={name}: only cpu and cuda devices are supported")
    return dev


def local_gpu(local_rank: int, visible: int) -> int:
    """The CUDA index of this process's GPU: its local rank on a node where every process sees all GPUs, 0 where
    each process sees one (CUDA_VISIBLE_DEVICES set per rank, as Slurm and some launchers do)."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise ValueError(f"local rank {local_rank} has no GPU: this process sees {visible} GPUs (CUDA_VISIBLE_DEVICES);"
                         " start at most one process per GPU (torchrun --nproc_per_node)")
    return local_rank


def setup(device: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; init the process group when world_size > 1: gloo on CPU;
    on GPU NCCL for CUDA tensors (FSDP) plus gloo for the CPU tensors train.py reduces (token counts, metrics).
    `timeout_s`: how long a collective waits for the slowest rank before it fails."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_gpu(local, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        cuda = dev.type == "cuda"
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", device_id=dev if cuda else None,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world, local, dev)


def cleanup() -> None:
    """Tear down the process group once every rank is done (a rank leaving early can abort gloo peers). Only on
    success: a rank that failed leaves at once (`exit_on_error`), and a barrier would wait for it in vain."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_on_error(d: Dist, message: str) -> None:
    """A rank that failed while others may wait in a collective: print its error once and leave now, non-zero, with
    no barrier; torchrun then stops the other ranks. (Waiting would hang every rank until the process-group
    timeout, and NCCL's watchdog could kill the process before the error is printed.)"""
    prefix = f"[rank {d.rank}] " if d.world_size > 1 else ""
    sys.stderr.write("".join(prefix + line + "\n" for line in message.rstrip("\n").split("\n")))
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def shard(model: Qwen2, compute_dtype: torch.dtype, trainable: bool = True, mesh=None) -> Qwen2:
    """FSDP2: shard each decoder block, then the root; register the log-prob methods (and the blocks' shared-prefix
    forward) as forward methods, so FSDP gathers the weights around them as around forward. `mesh`: the DeviceMesh
    to shard over (None: all ranks of the default process group; the dry run passes a fake one)."""
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
        register_fsdp_forward_method(block, "forward_shared")
    fully_shard(model, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(model, "token_logprobs")
    register_fsdp_forward_method(model, "shared_prefix_logprobs")
    if not trainable:
        model.requires_grad_(False)
    return model


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole parameter: all-gathered from its shards under FSDP (a collective), else itself."""
    return p.full_tensor() if isinstance(p, DTensor) else p.detach()


def gather_full_params(model: torch.nn.Module, dtype: torch.dtype,
                       dst: int = 0) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Yield (name, full parameter in `dtype` on the CPU) on rank `dst` and (name, None) elsewhere, one parameter at
    a time (a collective: every rank iterates). A rank holds at most one unsharded fp32 parameter and its cast copy
    on the device at once, not the whole model. Tied weights appear once."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    for name, p in model.named_parameters():
        full = _full(p)
        yield name, full.to(dtype).cpu() if rank == dst else None
        del full


def free_weights(model: torch.nn.Module) -> None:
    """Release the storage of every parameter (shapes stay): the rollout copy between uses. `copy_full_weights`
    allocates it again."""
    for p in model.parameters():
        p.untyped_storage().resize_(0)


@torch.no_grad()
def copy_full_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """dst <- src, gathering shards first when src is FSDP-sharded (the rollout copy is refreshed every step);
    re-allocates dst's parameters if `free_weights` released them. Each shard is cast to dst's dtype before the
    all-gather (the same numbers as casting after it: the cast is elementwise), so a bf16 copy of an fp32 policy
    moves half the bytes."""
    dst_params = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        d = dst_params[name]
        if d.untyped_storage().nbytes() == 0:
            d.untyped_storage().resize_(d.numel() * d.element_size())
        d.copy_(_full(p.detach().to(d.dtype)))


@dataclass
class Models:
    """The run's copies of the weights: the fp32 master policy (sharded over ranks), the frozen reference (beta > 0;
    sharded too) and the rollout copy (the policy itself in one fp32 process); `autocast` is the compute dtype
    around the policy's forward in one process (FSDP's MixedPrecisionPolicy does it when sharded)."""

    policy: Qwen2
    ref: Qwen2 | None
    rollout: Qwen2
    autocast: contextlib.AbstractContextManager


def build_models(cfg: TrainConfig, d: Dist, load: Callable[[torch.dtype], Qwen2], mesh=None) -> Models:
    """`load(dtype)` each model, sharding each before the next one loads (one full model on a device at a time).
    mesh: the DeviceMesh to shard over (None: every rank; the dry run makes one outside its fake tensors)."""
    dtype, sharded = DTYPES[cfg.dtype], d.world_size > 1
    policy = load(torch.float32)
    policy.gradient_checkpointing = cfg.gradient_checkpointing
    if sharded:
        shard(policy, dtype, mesh=mesh)
    ref = None
    if cfg.grpo_steps and cfg.grpo.kl_coef > 0:  # beta = 0: no reference model at all
        ref = load(dtype).requires_grad_(False)
        if sharded:
            shard(ref, dtype, trainable=False, mesh=mesh)
    rollout = policy
    if sharded or dtype != torch.float32:
        rollout = load(dtype)
        free_weights(rollout)  # filled by rollout_weights when it samples
    single = not sharded and dtype != torch.float32
    return Models(policy, ref, rollout, torch.autocast(d.device.type, dtype=dtype) if single else contextlib.nullcontext())


@contextlib.contextmanager
def rollout_weights(models: Models) -> Iterator[Qwen2]:
    """The model to sample from with the policy's current weights (on-policy): the rollout copy, filled for the
    duration and freed after, or the policy itself."""
    if models.rollout is models.policy:
        yield models.policy
        return
    copy_full_weights(models.policy, models.rollout)
    try:
        yield models.rollout
    finally:
        free_weights(models.rollout)


def cores_per_local_rank() -> int:
    """This process's share of the node's cores: usable cores // LOCAL_WORLD_SIZE (torchrun sets it), at least 1.

    Each rank owns a CPU pool (the SQL sandbox); sizing it to all cores on every rank would oversubscribe a node
    of 8 ranks 8x.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) a tensor over ranks; identity in a single process."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def reduce_sums(sums: dict) -> dict:
    """Each value of {name: number} summed over ranks (one collective, float64)."""
    keys = sorted(sums)
    return dict(zip(keys, all_reduce(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)).tolist()))


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
