"""Process-group setup, data sharding and the DDP / FSDP2 wrappers.

Everything reads the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), so
one command runs as a single CPU process, on N GPUs, or across nodes. Without those variables no
process group is created and every helper degrades to the single-process case.
"""
from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_minutes: int = 30) -> DistInfo:
    """Start the process group when launched by torchrun: nccl with GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


_TORCH_DEFAULT_THREADS = torch.get_num_threads()
"""PyTorch's own choice at start-up (one thread per physical core), before any run changed it."""


def default_threads(local_world_size: int) -> int:
    """CPU threads for one of ``local_world_size`` processes on this node: ``OMP_NUM_THREADS`` when
    set (torchrun sets 1 for several processes), else PyTorch's own default (the physical cores)
    shared out between the processes, at least 1.

    On a machine shared with other jobs fewer threads are faster (an op split over every core waits
    for its slowest, descheduled thread); there set ``train.threads`` or ``OMP_NUM_THREADS`` (see
    docs/training.md, "CPU threads", for the measurements both ways).
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, _TORCH_DEFAULT_THREADS // max(1, local_world_size))


def configure_threads(threads: int | None) -> int:
    """``torch.set_num_threads`` to ``threads`` (``None``: :func:`default_threads`); returns it."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    count = threads if threads is not None else default_threads(local_world)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes in place (a no-op for one process); returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable value from ``src`` to every process (identity for one process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: object) -> list[object]:
    """Collect one picklable value per process, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def subset_indices(num_samples: int, fraction: float) -> list[int] | None:
    """The training samples ``data.train_fraction`` keeps, in ascending order; None for all."""
    if fraction >= 1:
        return None
    count = max(1, math.ceil(fraction * num_samples))
    return sorted(torch.randperm(num_samples, generator=torch.Generator().manual_seed(0))[:count].tolist())


class TrainSampler(Sampler[int]):
    """Epoch-seeded shuffle where each global batch is split into contiguous per-rank slices.

    Global batch ``k`` is ``perm[k*B:(k+1)*B]`` whatever the world size, and rank ``r`` reads
    slice ``r`` of it, so 1 process with batch 8 and 2 processes with 4 each see the same samples
    per optimiser step. The incomplete last global batch is dropped (as the official
    ``iters_per_epoch = len // global_batch``). ``start_batch`` skips already-trained batches
    of the epoch on resume without loading them.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int,
                 fraction: float = 1.0) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        # ``fraction`` < 1: the same subset for every seed and process (a permutation seeded by 0)
        self.indices = subset_indices(num_samples, fraction)
        self.num_samples = num_samples if self.indices is None else len(self.indices)
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=generator).tolist()
        if self.indices is not None:
            perm = [self.indices[i] for i in perm]
        per_rank = self.global_batch // self.world_size
        for batch in range(self.start_batch, self.batches_per_epoch):
            first = batch * self.global_batch + self.rank * per_rank
            yield from perm[first : first + per_rank]

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * (self.global_batch // self.world_size)


class EvalSampler(Sampler[tuple[int, bool]]):
    """Strided shard of the evaluation set, padded so every rank runs the same number of batches.

    FSDP needs all ranks in every forward, so shards must have equal length. The sampler yields
    ``(index, is_padding)``; :class:`EvalDataset` turns the flag into the batch key
    ``is_padding`` so the task leaves repeated samples out of its metric.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.per_rank = math.ceil(num_samples / world_size)

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        for i in range(self.per_rank):
            position = self.rank + i * self.world_size
            yield position % self.num_samples, position >= self.num_samples

    def __len__(self) -> int:
        return self.per_rank


class EvalDataset(Dataset):
    """Adds ``is_padding`` to each (dict) sample of the wrapped evaluation dataset."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, bool]) -> dict:
        index, is_padding = key
        item = self.dataset[index]
        if not isinstance(item, dict):
            raise TypeError(f"evaluation samples must be dicts, got {type(item).__name__}")
        return {**item, "is_padding": is_padding}


class EvalCollate:
    """Batches :class:`EvalDataset` samples with the task's ``collate`` (the default collate when
    None) and adds ``is_padding`` as a bool tensor, so a task's collate never sees the flag."""

    def __init__(self, collate: Callable[[list], dict] | None = None) -> None:
        self.collate = collate

    def __call__(self, samples: list[dict]) -> dict:
        from torch.utils.data import default_collate

        flags = torch.tensor([bool(sample["is_padding"]) for sample in samples])
        rows = [{k: v for k, v in sample.items() if k != "is_padding"} for sample in samples]
        return {**(self.collate or default_collate)(rows), "is_padding": flags}


def find_blocks(model: nn.Module, block_lists: list[str] | None) -> list[nn.Module]:
    """The modules that form sharding / activation-checkpointing units, in model order."""
    if block_lists is None:
        lists = [m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name.split(".")[-1] == "layers"]
    else:
        lists = []
        for path in block_lists:
            module = model.get_submodule(path)
            if not isinstance(module, nn.ModuleList):
                raise ValueError(f"parallel.block_lists: '{path}' is a {type(module).__name__}, not a ModuleList")
            lists.append(module)
    return [block for modules in lists for block in modules]


def apply_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Recompute each block in backward (:func:`beit3.layers.checkpoint_blocks`, the one
    implementation the models' ``gradient_checkpointing_enable`` uses too)."""
    from beit3.layers import checkpoint_blocks

    checkpoint_blocks(blocks)


def apply_compile(blocks: list[nn.Module], backend: str = "inductor") -> None:
    """``torch.compile`` each block in place (torchtitan's per-block compile).

    The module tree and parameter names stay as they are (checkpoints and FSDP2 see the same
    model). Apply after activation checkpointing and before FSDP2 / DDP. Blocks
    of one model share their code: with parameters as graph inputs (PyTorch's default), every
    block reuses one compiled graph per kind of call (streams present, training or evaluation,
    with or without a vision-language expert), so compilation costs about one block, not the
    depth.

    The block's ``forward`` is compiled, not its whole call: hooks stay eager around it (the
    composable activation checkpoint, whose context manager Dynamo cannot trace, and FSDP2's
    all-gathers), and the recomputation in backward runs the compiled forward again. Each kind of
    call is a separate compiled graph (about ten for a model trained on images, texts and pairs, and
    evaluated), so Dynamo's per-function recompilation limit is raised to 64 from its default of 8;
    past it a block would silently run uncompiled. ``backend``: ``torch.compile``'s (tests use
    ``aot_eager``, which traces the same graphs without generating kernels).
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in blocks:
        if not getattr(block, "_beit3_compiled", False):
            block.forward = torch.compile(block.forward, backend=backend)
            block._beit3_compiled = True


def apply_fsdp(
    model: nn.Module,
    blocks: list[nn.Module],
    *,
    device: torch.device,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool,
) -> nn.Module:
    """FSDP2: shard each block, then the root, over a 1-D mesh of all processes.

    With ``param_dtype`` set, parameters are gathered in that dtype for compute while gradients
    are reduced and stored in float32 (the FSDP form of bf16 mixed precision).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def build_on_main(build: Callable[[], nn.Module], info: DistInfo) -> nn.Module:
    """``build()`` on the main process (moved to ``info.device``), on the ``meta`` device elsewhere.

    The other processes then hold no weights until :func:`materialize_from_main` (after FSDP2
    sharding) gives them their shards of the main process's values, so the weights are exactly the
    eager build's. Python, NumPy and torch RNG states are then set to the main process's, as if every
    process had built the model eagerly.
    """
    from beit3.training.checkpoint import capture_rng_state, restore_rng_state

    if info.is_main:
        model = build().to(info.device)
    else:
        with torch.device("meta"):
            model = build()
    state = broadcast_object(capture_rng_state() if info.is_main else None)
    if not info.is_main:
        restore_rng_state(state)  # type: ignore[arg-type]
    return model


def materialize_from_main(model: nn.Module, full_state: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """After ``fully_shard``: allocate the meta-built processes' shards and fill every process's shards
    from the main process's full state dict (``full_state``, taken before sharding; None elsewhere),
    then copy the main process's buffers (non-persistent ones are not in a state dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model.to_empty(device=device)
    set_model_state_dict(model, full_state if dist.get_rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def apply_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )
