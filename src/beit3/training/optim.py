"""Optimizer parameter groups, the warmup + cosine schedule and the weight EMA.

The model only *declares* what the optimizer needs (``no_weight_decay()``, ``layer_id(name)``,
``config.num_layers``); the policy lives here, so every model that follows that protocol gets the
official recipe: no decay on 1-D tensors / biases / declared names, LR scale
``layer_decay ** (L + 1 - layer_id)`` and an extra multiplier for the task head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GroupKey:
    """What makes two parameters share an optimizer group."""

    decay: bool
    layer_id: int
    head: bool

    @property
    def name(self) -> str:
        kind = "decay" if self.decay else "no_decay"
        return f"layer_{self.layer_id}_{kind}" + ("_head" if self.head else "")


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    layer_decay: float = 1.0,
    head_lr_scale: float = 1.0,
) -> list[dict]:
    """Split trainable parameters into AdamW groups, each carrying an ``lr_scale``.

    Returns dicts with ``params``, ``weight_decay``, ``lr_scale`` and ``group_name``; the schedule
    multiplies its learning rate by ``lr_scale`` per group. Names are the model's own parameter
    names, so call this on the unwrapped module (FSDP2 ``fully_shard`` keeps names unchanged).
    """
    skip = set(model.no_weight_decay())
    num_layers = int(model.config.num_layers)
    top = num_layers + 1
    groups: dict[GroupKey, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
        layer = int(model.layer_id(name))
        if not 0 <= layer <= top:
            raise ValueError(f"layer_id({name!r}) = {layer} is outside 0..{top}")
        head = layer == top and name.startswith("head")
        key = GroupKey(decay=decay, layer_id=layer, head=head)
        if key not in groups:
            scale = layer_decay ** (top - layer)
            if head:
                scale *= head_lr_scale
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "group_name": key.name,
            }
        groups[key]["params"].append(param)
    ordered = sorted(groups.items(), key=lambda kv: (kv[0].layer_id, kv[0].head, kv[0].decay))
    return [group for _, group in ordered]


def warmup_cosine_lr(
    step: int, *, base_lr: float, min_lr: float, warmup_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """Learning rate for optimiser step ``step`` (0-based).

    Warmup is linear from ``warmup_lr`` at step 0 towards ``base_lr``, reached at ``warmup_steps``;
    then a half cosine from ``base_lr`` to ``min_lr`` at ``total_steps``. Past the end it stays at
    ``min_lr``.
    """
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Sets each group's ``lr`` to ``warmup_cosine_lr(step) * group['lr_scale']``.

    Its only state is the step counter, so resuming restores the exact learning rate.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        base_lr: float,
        min_lr: float,
        warmup_lr: float,
        warmup_steps: int,
        total_steps: int,
    ) -> None:
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.min_lr = min_lr
        self.warmup_lr = warmup_lr
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        return warmup_cosine_lr(
            step,
            base_lr=self.base_lr,
            min_lr=self.min_lr,
            warmup_lr=self.warmup_lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
        )

    @property
    def current_lr(self) -> float:
        """The unscaled learning rate the next optimiser step uses."""
        return self.lr_at(self.step_count)

    def _apply(self) -> None:
        lr = self.current_lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


class WeightEma:
    """Exponential moving average of the trainable parameters, kept in float32.

    The shadow tensors mirror the live parameters one to one (for FSDP they are shards of the
    same layout), so updating is a local ``lerp_`` with no communication.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().float().clone() for n in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name in self.names:
            self.shadow[name].lerp_(params[name].detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange live and averaged weights (call twice to restore)."""
        params = dict(model.named_parameters())
        for name in self.names:
            live = params[name].detach().clone()
            params[name].copy_(self.shadow[name].to(live.dtype))
            self.shadow[name].copy_(live.float())
