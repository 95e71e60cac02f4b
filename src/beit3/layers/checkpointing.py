"""Activation checkpointing of whole blocks: the one switch behind the config flag, the model
method and the training engine."""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block in the backward pass instead of storing its activations.

    Uses PyTorch's composable checkpoint, which works through forward hooks: parameter names and
    the module tree stay as they are (checkpoints load unchanged, FSDP2 can shard the same
    blocks), and the RNG state is restored for the recomputation, so drop path draws the same
    mask twice and the gradients equal those of a plain run. A block that is already
    checkpointed is left alone, so calling this twice (the config flag, then the engine) is safe.
    The hooks stay for the life of the module and also run in evaluation mode; under
    ``torch.no_grad`` nothing is stored, so nothing is recomputed either.
    """
    from torch.distributed._composable import checkpoint  # imported here: only a model that uses it pays

    for block in blocks:
        if checkpoint.state(block) is None:
            checkpoint(block)
