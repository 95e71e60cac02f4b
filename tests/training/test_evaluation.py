"""The engine reduces evaluation statistics, on the process group's device.

NCCL, the backend the engine starts on GPUs, rejects CPU tensors. These tests make gloo behave
like it: every tensor handed to a collective must claim to be on ``cuda:0``, the engine's
device. ``FakeCuda`` is a CPU tensor that reports ``cuda:0`` as its device, made by ``.to("cuda")``
(patched, as no GPU is here), and the wrapped collectives reject any other tensor. Before the
engine owned the reduction, tasks all-reduced CPU tensors themselves and this failed.
"""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from beit3.catalogue import TaskSpec
from beit3.training import distributed as D
from beit3.training.evaluation import accumulate, evaluate_batches, reduce_statistics
from tests.tiny_pipelines import free_port

CUDA = torch.device("cuda", 0)


class FakeCuda(torch.Tensor):
    """A CPU tensor that says it lives on cuda:0 (results of ops on it say so too)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.cpu,):
            return args[0].as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs or {})


def _plain_to(original):
    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda":
            return self.as_subclass(torch.Tensor).clone().as_subclass(FakeCuda)
        return original(self, *args, **kwargs)
    return to


def _nccl_like(collective):
    def run(tensor, *args, **kwargs):
        if tensor.device != CUDA:
            raise RuntimeError(f"NCCL-like collective got a tensor on {tensor.device}; the group's device is {CUDA}")
        return collective(tensor.as_subclass(torch.Tensor), *args, **kwargs)
    return run


def nccl_like_group(monkeypatch) -> None:
    """Collectives reject tensors not on cuda:0, and ``.to("cuda")`` makes FakeCuda tensors."""
    monkeypatch.setattr(torch.Tensor, "to", _plain_to(torch.Tensor.to))
    monkeypatch.setattr(dist, "all_reduce", _nccl_like(dist.all_reduce))
    monkeypatch.setattr(dist, "broadcast", _nccl_like(dist.broadcast))


class Stats:
    """A task with every kind of statistic; values depend on the rank's rows."""

    spec = TaskSpec(name="stats", kind="finetune", metric="mean",
                    statistics={"total": "sum", "count": "sum", "largest": "max", "rows": "gather"})

    def eval_step(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        keep = ~batch["is_padding"]
        x = batch["x"]
        return {"total": (x * keep).sum(), "count": keep.sum(), "largest": x[keep].max(),
                "rows": batch["index"][keep].tolist()}

    def compute_metrics(self, stats: dict[str, Any]) -> dict[str, float]:
        return {"mean": float(stats["total"] / stats["count"]), "largest": float(stats["largest"]),
                "rows": float(len(stats["rows"])), "distinct": float(len(set(stats["rows"])))}


def shard(rank: int, world: int, rows: int = 7) -> list[dict[str, torch.Tensor]]:
    keys = list(D.EvalSampler(rows, rank, world))
    batches = []
    for start in range(0, len(keys), 2):
        chunk = keys[start:start + 2]
        index = torch.tensor([i for i, _ in chunk])
        batches.append({"x": index.double() * 1.5, "index": index, "is_padding": torch.tensor([p for _, p in chunk])})
    return batches


def _worker(rank: int, world: int, port: int, out: str, device: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        monkeypatch = pytest.MonkeyPatch()
        nccl_like_group(monkeypatch)
        task = Stats()
        metrics, _ = evaluate_batches(task, None, shard(rank, world), torch.device(device))
        failure = None
        try:  # the old way: a task all-reducing its own CPU tensor
            D.all_reduce_sum(torch.zeros(3, dtype=torch.float64))
        except RuntimeError as err:
            failure = str(err)
        monkeypatch.undo()
        if rank == 0:
            torch.save({"metrics": metrics, "failure": failure}, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_reduce_on_the_group_device_and_match_one(tmp_path):
    one, _ = evaluate_batches(Stats(), None, shard(0, 1), torch.device("cpu"))
    assert one == {"mean": 1.5 * 3, "largest": 9.0, "rows": 7.0, "distinct": 7.0}
    out = tmp_path / "two.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out), "cuda"), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    assert two["metrics"] == one  # padding rows counted nowhere, every row once
    assert "NCCL-like collective got a tensor on cpu" in two["failure"]  # what tasks did before


def test_undeclared_statistics_are_named():
    with pytest.raises(KeyError, match="'extra', which the task's spec does not declare"):
        accumulate({}, {"extra": torch.tensor(1.0)}, {"total": "sum"})


def test_single_process_reduction_moves_nothing_through_collectives(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no collective without a process group")

    monkeypatch.setattr(dist, "all_reduce", refuse)
    stats = reduce_statistics({"total": torch.tensor(2.0), "rows": [1, 2]}, {"total": "sum", "rows": "gather"},
                              torch.device("cpu"))
    assert stats == {"total": torch.tensor(2.0), "rows": [1, 2]}


def _cuda_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    try:
        device = torch.device("cuda", rank)
        batches = [{k: v.to(device) for k, v in b.items()} for b in shard(rank, world)]
        metrics, _ = evaluate_batches(Stats(), None, batches, device)
        if rank == 0:
            torch.save(metrics, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_group_reduces_statistics_on_the_gpu(tmp_path):
    """The same path on a real NCCL group (one process per visible GPU, at least one)."""
    world = max(1, min(2, torch.cuda.device_count()))
    out = tmp_path / "nccl.pt"
    mp.spawn(_cuda_worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
    one, _ = evaluate_batches(Stats(), None, shard(0, 1), torch.device("cpu"))
    assert torch.load(out, weights_only=True) == one
