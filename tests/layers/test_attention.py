"""The CPU bf16 attention path against float32 scaled_dot_product_attention."""
import pytest
import torch
import torch.nn.functional as F


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_bf16_cpu_attention_matches_float32_sdpa(mask_kind):
    from beit3.layers.attention import _bf16_cpu_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 16, generator=g) for _ in range(3))
    allowed = torch.rand(2, 1, 37, 37, generator=g) > 0.3
    allowed[..., 0] = True  # every query keeps one key
    mask = {"bool": allowed, "additive": torch.where(allowed, 0.0, float("-inf")), "none": None}[mask_kind]
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed if mask is not None else None)
    out = _bf16_cpu_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)
