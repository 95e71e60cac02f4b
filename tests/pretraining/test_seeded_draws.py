"""The per-sample random draws of pretraining data: seeded by the sample's place, leaving every other
generator as it was (the model's dropout on the GPU included)."""
from __future__ import annotations

import pytest
import torch

from beit3.pretraining.data import seeded_draws


def test_draws_follow_the_entropy_and_the_global_generator_is_restored():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with seeded_draws([7, 1, 2]) as rng:
        first = (torch.rand(3), rng.random())
    assert torch.equal(torch.get_rng_state(), before)
    with seeded_draws([7, 1, 2]) as rng:
        again = (torch.rand(3), rng.random())
    with seeded_draws([7, 1, 3]) as rng:
        other = (torch.rand(3), rng.random())
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert not torch.equal(first[0], other[0]) and first[1] != other[1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_draws_leave_the_cuda_generator_alone():
    """torch.manual_seed would reseed CUDA too, which fork_rng(devices=[]) does not restore: in a
    num_workers=0 run every sample would reset the model's dropout stream on the GPU."""
    torch.cuda.init()
    torch.cuda.manual_seed(5)
    before = torch.cuda.get_rng_state()
    with seeded_draws([1, 2, 3]):
        torch.rand(4)
    assert torch.equal(torch.cuda.get_rng_state(), before)
