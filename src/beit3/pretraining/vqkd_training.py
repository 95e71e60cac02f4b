"""Training a VQ-KD visual tokenizer against a frozen teacher, and measuring its codebook usage.

The library side of ``beit3 visual-tokenizer`` (:mod:`beit3.pretraining.commands`).
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms as T
from torch import nn

from beit3.pretraining.teachers import HOGTeacher, TimmTeacher
from beit3.pretraining.vqkd import VQKD, VQKDConfig


def image_source(pattern: str):
    """Tar shards (``*.tar`` globs) or an image folder."""
    from beit3.data import ImageFolder, TarShards

    if pattern.endswith(".tar"):
        return TarShards(pattern)
    if not Path(pattern).is_dir():
        raise FileNotFoundError(f"--images {pattern} is not a folder: pass an image folder or a quoted glob of "
                                "tar shards, e.g. 'data/synthetic/pretrain/images/*.tar'")
    return ImageFolder(pattern)


def build_teacher(spec: str, config: VQKDConfig, checkpoint: str | None = None, teacher_size: int | None = None) -> nn.Module:
    """``hog`` (built in) or ``timm:<model name>`` with a local ``checkpoint``."""
    if spec == "hog":
        return HOGTeacher(config.patch_size)
    if spec.startswith("timm:"):
        name = spec.partition(":")[2]
        clip = "clip" in name
        return TimmTeacher(name, checkpoint, input_size=teacher_size or config.image_size,
                           num_classes=config.teacher_dim if clip else 0, apply_head=clip)
    raise ValueError(f"unknown teacher {spec!r}; use 'hog' or 'timm:<model name>'")


def train_visual_tokenizer(
    images: Sequence[Any],
    load,
    config: VQKDConfig,
    teacher: nn.Module,
    *,
    steps: int,
    batch_size: int,
    lr: float = 2e-4,
    min_lr: float = 1e-5,
    warmup_steps: int = 0,
    weight_decay: float = 1e-4,
    seed: int = 0,
    log_every: int = 50,
    device: str | torch.device = "cpu",
    log=print,
) -> VQKD:
    """BEiT v2's recipe on ``images`` (references; ``load(ref)`` gives a dict with ``image``).

    AdamW (0.9, 0.99), cosine schedule after a linear warmup, random resized crop (0.08, 1) +
    flip, tokenizer and teacher both fed [0, 1] pixels. Returns the trained tokenizer (eval mode).
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    transform = T.Compose([T.RandomResizedCrop(config.image_size, scale=(0.08, 1.0),
                                               interpolation=T.InterpolationMode.BICUBIC),
                           T.RandomHorizontalFlip(), T.ToTensor()])
    model = VQKD(config).to(device).train()
    teacher = teacher.to(device).eval()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in model.no_weight_decay() else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99), eps=1e-8)
    start = time.perf_counter()
    for step in range(steps):
        if step < warmup_steps:
            current = lr * (step + 1) / warmup_steps
        else:
            progress = (step - warmup_steps) / max(1, steps - warmup_steps)
            current = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = current
        batch = torch.stack([transform(load(rng.choice(images))["image"].convert("RGB")) for _ in range(batch_size)])
        batch = batch.to(device)
        out = model(batch, teacher(batch), value_range="unit")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            used = torch.unique(out.indices).numel()
            log(f"step {step + 1}/{steps}  rec {out.reconstruction_loss.item():.4f}  "
                f"commit {out.commitment_loss.item():.4f}  codes in batch {used}  "
                f"restarted {out.num_restarted}  lr {current:.2e}  {time.perf_counter() - start:.0f}s")
    return model.eval()


@torch.no_grad()
def codebook_usage(model: VQKD, images: Sequence[Any], load, *, batch_size: int = 64,
                   device: str | torch.device = "cpu") -> dict[str, float]:
    """Used codes, their share of the codebook and the code perplexity over ``images`` (eval view)."""
    transform = T.Compose([T.Resize((model.config.image_size, model.config.image_size),
                                    interpolation=T.InterpolationMode.BICUBIC), T.ToTensor()])
    model = model.to(device).eval()
    counts = torch.zeros(model.config.codebook_size, dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(load(ref)["image"].convert("RGB")) for ref in images[start:start + batch_size]])
        ids = model.get_codebook_indices(batch.to(device), value_range="unit").cpu()
        counts += torch.bincount(ids.reshape(-1), minlength=model.config.codebook_size).double()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum().item()
    used = int((counts > 0).sum())
    return {"used_codes": used, "codebook_size": model.config.codebook_size,
            "usage": used / model.config.codebook_size, "perplexity": math.exp(entropy),
            "num_patches": int(counts.sum())}


# --------------------------------------------------------------------------------------------------
