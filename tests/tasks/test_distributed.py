"""Retrieval over 2 gloo processes equals 1 process: the gathered loss's gradients and the R@K."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from beit3.models import Beit3ForImageTextRetrieval
from beit3.tasks.retrieval import RetrievalTask
from beit3.training.config import config_from_dict
from beit3.training.distributed import EvalSampler
from beit3.training.evaluation import evaluate_batches
from tests.tiny_pipelines import free_port

BATCH, EVAL_ROWS, TEXT_LEN = 8, 7, 6


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "pixel_values": torch.randn(BATCH, 3, 32, 32, generator=g),
        "input_ids": torch.randint(3, 90, (BATCH, TEXT_LEN), generator=g),
        "attention_mask": torch.ones(BATCH, TEXT_LEN, dtype=torch.long),
    }


def make_model() -> Beit3ForImageTextRetrieval:
    """Built as the task builds it (frozen image mask token), so plain DDP syncs every gradient."""
    torch.manual_seed(0)
    cfg = config_from_dict({"task": {"name": "retrieval"}, "model": {"preset": "tiny", "image_size": 32, "drop_path_rate": 0.0}})
    return make_task().build_model(cfg)


def make_task() -> RetrievalTask:
    return RetrievalTask(config_from_dict({"task": {"name": "retrieval", "options": {}}}))


def eval_batches(rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """The engine's evaluation shards (strided, padded to equal length), in batches of 2."""
    inputs = make_inputs()
    image_ids = torch.tensor([4, 1, 1, 9, 4, 2, 9, 3])
    keys = list(EvalSampler(EVAL_ROWS, rank, world))
    batches = []
    for start in range(0, len(keys), 2):
        chunk = keys[start:start + 2]
        index = torch.tensor([i for i, _ in chunk])
        batch = {k: v[index] for k, v in inputs.items()}
        batch.update(image_id=image_ids[index], index=index, is_padding=torch.tensor([p for _, p in chunk]))
        batches.append(batch)
    return batches


def grads_and_metrics(rank: int, world: int) -> tuple[dict[str, torch.Tensor], dict[str, float], float]:
    task = make_task()
    model = make_model()
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    inputs = make_inputs()
    local = BATCH // world
    batch = {k: v[rank * local:(rank + 1) * local] for k, v in inputs.items()}
    loss, _ = task.train_step(wrapped, batch, step=0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        metrics, _ = evaluate_batches(task, wrapped, eval_batches(rank, world), torch.device("cpu"))
    return grads, metrics, float(loss.detach())


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        grads, metrics, loss = grads_and_metrics(rank, world)
        if rank == 0:
            torch.save({"grads": grads, "metrics": metrics}, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path):
    grads, metrics, _ = grads_and_metrics(0, 1)
    out = tmp_path / "two.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    assert two["metrics"] == metrics
    assert metrics["texts"] == EVAL_ROWS
    assert set(two["grads"]) == set(grads)
    assert "logit_scale" in grads and grads["logit_scale"].abs() > 0
    for name, grad in grads.items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
