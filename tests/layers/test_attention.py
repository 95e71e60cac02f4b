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


def test_the_cpu_bf16_kernel_is_chosen_by_setting_or_by_the_cpu(monkeypatch):
    import beit3.layers.attention as attention

    assert attention.choose_cpu_bf16_attention("sdpa") == "sdpa"
    assert attention.choose_cpu_bf16_attention(" MATMUL ") == "matmul"
    with pytest.raises(ValueError, match="BEIT3_CPU_BF16_ATTENTION must be one of auto, matmul, sdpa"):
        attention.choose_cpu_bf16_attention("flash")
    monkeypatch.setattr(torch._C._cpu, "_init_amx", lambda: True, raising=False)
    assert attention.choose_cpu_bf16_attention("auto") == "sdpa"
    monkeypatch.setattr(torch._C._cpu, "_init_amx", lambda: False, raising=False)
    assert attention.choose_cpu_bf16_attention("") == "matmul"
    monkeypatch.setenv("BEIT3_CPU_BF16_ATTENTION", "sdpa")
    assert attention.choose_cpu_bf16_attention() == "sdpa"


@pytest.mark.parametrize("kernel", ["matmul", "sdpa"])
def test_both_cpu_bf16_kernels_run_the_layer_and_agree(monkeypatch, kernel):
    """The layer takes the chosen kernel: the matmul path is called only when chosen, and both give
    float32 SDPA's answer to bf16 precision."""
    import beit3.layers.attention as attention

    calls = []
    real = attention._bf16_cpu_attention
    monkeypatch.setattr(attention, "_bf16_cpu_attention", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(attention, "CPU_BF16_ATTENTION", kernel)
    torch.manual_seed(0)
    layer = attention.Attention(32, 4, 1e-5, decoupled=False)
    x = torch.randn(2, 9, 32)
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    with torch.no_grad():
        expected, _ = layer([("vision", x)], mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, _ = layer([("vision", x)], mask)
    assert bool(calls) == (kernel == "matmul")
    torch.testing.assert_close(got[0].float(), expected[0], atol=5e-2, rtol=5e-2)
