"""Per-modality experts.

A Multiway module holds one copy of a sub-module per modality ("vision", "text" and, in the
paper's top layers, "vl"). Which copy runs is decided by the caller, by name, for each stream of
tokens: the official code stores a mutable ``split_position`` on every module instead, so a
sub-module called on its own silently uses whatever routing the last call left behind.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

MODALITIES = ("vision", "text", "vl")


class Experts(nn.ModuleDict):
    """One independently initialised copy of a module per expert name."""

    def __init__(self, make: Callable[[], nn.Module], names: tuple[str, ...] = ("vision", "text")):
        unknown = set(names) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown expert name(s) {sorted(unknown)}; expected a subset of {MODALITIES}")
        super().__init__({name: make() for name in names})


def expert(module: nn.Module, name: str) -> nn.Module:
    """The copy of ``module`` that serves expert ``name``; a shared module serves everyone."""
    if isinstance(module, Experts):
        return module[name]
    return module
