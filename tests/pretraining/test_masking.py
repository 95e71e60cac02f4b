import math
import random
import time

import numpy as np
import pytest
import torch

from beit3.pretraining import BlockMaskingGenerator, mask_text_tokens


def reference_mask(H, W, target, rng, min_patches=16, min_aspect=0.3):
    """A literal per-image transcription of the BEiT v2 rules (pretraining.md section 3)."""
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros((H, W), dtype=int)
    count, blocks = 0, 0
    while count < target:
        budget = min(target - count, target)
        delta = 0
        for _ in range(10):
            area = rng.uniform(min_patches, budget)
            r = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
            if w < W and h < H:
                top, left = rng.randint(0, H - h), rng.randint(0, W - w)
                new = h * w - mask[top:top + h, left:left + w].sum()
                if 0 < new <= budget:
                    mask[top:top + h, left:left + w] = 1
                    delta = new
                    blocks += 1
                    break
        if delta == 0:
            break
        count += delta
    return count, blocks


@pytest.mark.parametrize("grid, target", [(14, 75), (16, 102)])
def test_exact_count_and_statistics_match_the_reference_rules(grid, target):
    gen = BlockMaskingGenerator(grid, target)
    mask, blocks = gen.generate(4000, generator=0)
    assert mask.shape == (4000, grid, grid)
    assert (mask.reshape(4000, -1).sum(1) == target).all()  # exactly M, always

    per_image = np.bincount([b.image for b in blocks], minlength=4000)
    rect = np.zeros_like(mask)
    for b in blocks:
        rect[b.image, b.top:b.top + b.height, b.left:b.left + b.width] = True
    topped_up = (rect.reshape(4000, -1).sum(1) < target).mean()

    rng = random.Random(0)
    ref = [reference_mask(grid, grid, target, rng) for _ in range(4000)]
    ref_blocks = np.mean([b for _, b in ref])
    ref_topped = np.mean([c < target for c, _ in ref])
    assert abs(per_image.mean() - ref_blocks) < 0.15
    assert abs(topped_up - ref_topped) < 0.04
    # pretraining.md measured ~4.1 / ~4.6 blocks and a top-up in ~1/3 of the masks
    assert abs(per_image.mean() - {14: 4.1, 16: 4.6}[grid]) < 0.25
    assert 0.25 < topped_up < 0.42


def test_blocks_have_the_allowed_sizes_and_aspects():
    gen = BlockMaskingGenerator(16, 102)
    _, blocks = gen.generate(500, generator=1)
    for b in blocks:
        assert 1 <= b.height < 16 and 1 <= b.width < 16
        assert 0 <= b.top <= 16 - b.height and 0 <= b.left <= 16 - b.width
        # h = round(sqrt(a r)), w = round(sqrt(a / r)) for some area a <= 102 and r in [0.3, 1/0.3]
        assert (b.height - 0.5) * (b.width - 0.5) <= 102
        assert (b.height - 0.5) / (b.width + 0.5) <= 1 / 0.3
        assert (b.height + 0.5) / (b.width - 0.5) >= 0.3
    first = {}
    for b in blocks:
        first.setdefault(b.image, b)
    # the first block of an image has a target area of at least 16 cells
    assert all((b.height + 0.5) * (b.width + 0.5) >= 16 for b in first.values())
    assert np.mean([b.height * b.width for b in first.values()]) > 30


def test_ratio_constructor_and_custom_limits():
    gen = BlockMaskingGenerator.from_ratio(16, 0.4)
    assert gen.num_masking_patches == 102
    masks = gen(64, generator=3)
    assert masks.dtype == torch.bool and masks.shape == (64, 256)
    assert (masks.sum(1) == 102).all()
    small = BlockMaskingGenerator((4, 6), 10, min_num_patches=2, max_num_patches=4, min_aspect=0.5)
    mask, blocks = small.generate(200, generator=0)
    assert (mask.reshape(200, -1).sum(1) == 10).all()
    assert all((b.height - 0.5) * (b.width - 0.5) <= 4 for b in blocks)
    assert not BlockMaskingGenerator(8, 0)(3).any()
    with pytest.raises(ValueError):
        BlockMaskingGenerator(8, 65)


def test_seeded_determinism():
    gen = BlockMaskingGenerator(14, 75)
    assert torch.equal(gen(32, generator=7), gen(32, generator=7))
    assert not torch.equal(gen(32, generator=7), gen(32, generator=8))


def test_a_large_batch_is_fast():
    gen = BlockMaskingGenerator(16, 102)
    gen(64, generator=0)
    start = time.perf_counter()
    gen(2048, generator=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{elapsed:.3f}s for 2048 masks"


def test_text_masking_rules():
    g = torch.Generator().manual_seed(0)
    bos, pad, eos, mask_id, vocab = 0, 1, 2, 99, 100
    lengths = [40, 12, 3, 2]
    ids = torch.full((4, 40), pad)
    attn = torch.zeros(4, 40, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(4, 90, (n,), generator=g)
        ids[row, 0], ids[row, n - 1] = bos, eos
        attn[row, :n] = 1
    out, labels = mask_text_tokens(ids, attn, 0.5, mask_token_id=mask_id, vocab_size=vocab,
                                   special_ids=(bos, pad, eos), generator=g)
    picked = labels != -100
    # n maskable = length - 2; count = clamp(round(n/2), 1, max(n-1, 1)); a row of BOS+EOS only: none
    assert picked.sum(1).tolist() == [19, 5, 1, 0]
    assert torch.equal(labels[picked], ids[picked])
    assert not picked[ids == bos].any() and not picked[ids == eos].any() and not picked[attn == 0].any()
    assert torch.equal(out[~picked], ids[~picked])


def test_text_masking_80_10_10_split():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (256, 128), generator=g)
    ids[:, 0] = 0
    attn = torch.ones_like(ids)
    out, labels = mask_text_tokens(ids, attn, 0.15, mask_token_id=1001, vocab_size=1002,
                                   special_ids=(0, 1, 2), generator=g)
    picked = labels != -100
    assert picked.sum(1).eq(round(127 * 0.15)).all()
    as_mask = (out[picked] == 1001).float().mean()
    kept = (out[picked] == ids[picked]).float().mean()
    assert abs(as_mask - 0.8) < 0.03 and abs(kept - 0.1 - 0.1 / 999) < 0.03  # 5 sigma over 4864 tokens
    assert out[picked].min() >= 3
