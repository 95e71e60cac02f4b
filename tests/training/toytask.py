"""A tiny task that follows the engine's protocols, so the engine is tested without BEiT-3.

The model has the parameter naming the real models use (embeddings, ``layers.N.``, final norm,
``head``) and declares ``no_weight_decay`` / ``layer_id`` / ``config.num_layers``. Options
(``task.options``) let tests inject non-finite samples, input noise drawn from the global RNG (to
check RNG state is restored on resume) and a per-step delay (to kill a run mid-training).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from beit3.catalogue import TaskSpec
from beit3.training.config import RunConfig


@dataclass
class ToyConfig:
    num_layers: int = 2
    dim: int = 8


class ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class ToyModel(nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Linear(config.dim, config.dim)
        self.embed_pos = nn.Parameter(torch.randn(1, config.dim) * 0.02)
        self.layers = nn.ModuleList(ToyBlock(config.dim) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, 1)

    def no_weight_decay(self) -> set[str]:
        return {"embed_pos"}

    def layer_id(self, name: str) -> int:
        if name.startswith("embed"):
            return 0
        if name.startswith("layers."):
            return int(name.split(".")[1]) + 1
        return self.config.num_layers + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.embed_pos
        for block in self.layers:
            h = block(h)
        return self.head(self.norm(h)).squeeze(-1)


class ToyDataset(Dataset):
    def __init__(self, size: int, dim: int, seed: int, nan_indices: list[int]) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, dim, generator=g)
        self.y = torch.sin(self.x.sum(dim=1))
        for i in nan_indices:
            self.x[i] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index]}


class ToyTask:
    spec = TaskSpec(name="toy", kind="finetune", description="toy regression", metric="mse", higher_is_better=False,
                    statistics={"squared_error": "sum", "samples": "sum"})
    collate_fn = staticmethod(default_collate)

    def __init__(self, options: dict[str, Any]) -> None:
        known = {"train_size", "val_size", "noise", "sleep", "nan_indices", "dim"}
        unknown = set(options) - known
        if unknown:
            raise KeyError(f"unknown toy task options {sorted(unknown)}")
        self.train_size = int(options.get("train_size", 64))
        self.val_size = int(options.get("val_size", 10))
        self.noise = float(options.get("noise", 0.0))
        self.sleep = float(options.get("sleep", 0.0))
        self.nan_indices = list(options.get("nan_indices", []))
        self.dim = int(options.get("dim", 8))

    def build_model(self, cfg: RunConfig) -> nn.Module:
        return ToyModel(ToyConfig(num_layers=2, dim=self.dim))

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        train = ToyDataset(self.train_size, self.dim, seed=0, nan_indices=self.nan_indices)
        val = ToyDataset(self.val_size, self.dim, seed=1, nan_indices=[]) if self.val_size else None
        return train, val

    def train_step(self, model: nn.Module, batch: dict[str, Any], *, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if self.sleep:
            time.sleep(self.sleep)
        x = batch["x"]
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        pred = model(x)
        loss = torch.nn.functional.mse_loss(pred.float(), batch["y"])
        return loss, {"pred_mean": pred.detach().float().mean().item()}

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        keep = ~batch["is_padding"]
        err = (model(batch["x"]).float() - batch["y"]) ** 2
        return {"squared_error": err[keep].double().sum(), "samples": keep.sum()}

    def compute_metrics(self, stats: dict[str, Any]) -> dict[str, float]:
        return {"mse": float(stats["squared_error"] / stats["samples"])}

    def num_tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["x"].numel())


def make(cfg: RunConfig) -> ToyTask:
    return ToyTask(cfg.task.options)
