import math

import pytest
import torch
import torch.nn.functional as F

from beit3.pretraining.teachers import HOGTeacher, TimmTeacher
from beit3.pretraining.vqkd import (
    VQKD,
    NormEMAVectorQuantizer,
    VQKDConfig,
    cosine_kmeans,
    load_beitv2_tokenizer,
)


def test_lookup_is_cosine_and_gradients_pass_straight_through():
    config = VQKDConfig.tiny(codebook_size=8, code_dim=4)
    q = NormEMAVectorQuantizer(config).eval()
    z = torch.randn(2, 5, 4, requires_grad=True)
    out = q(z)
    codebook = q.embedding.weight
    expected = (F.normalize(z, dim=-1) @ codebook.t()).argmax(-1)
    assert torch.equal(out.indices, expected)
    # scaling a vector does not change its code (cosine, not Euclidean, lookup)
    assert torch.equal(q.lookup(z * 7.0), expected)
    assert torch.allclose(out.quantized, codebook[expected], atol=1e-6)
    out.quantized.sum().backward()
    # d(quantized)/dz is the identity on the normalised vector: grad = Jacobian of normalize applied to ones
    z2 = z.detach().clone().requires_grad_(True)
    F.normalize(z2, dim=-1).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)
    assert math.isclose(out.commitment_loss.item(),
                        F.mse_loss(codebook[expected], F.normalize(z.detach(), dim=-1)).item(), rel_tol=1e-5)
    assert not bool(q.embedding.initted)  # eval mode never initialises or updates


def test_kmeans_init_then_ema_update_follow_the_formula():
    torch.manual_seed(0)
    config = VQKDConfig.tiny(codebook_size=4, code_dim=3, decay=0.9)
    q = NormEMAVectorQuantizer(config).train()
    data = F.normalize(torch.eye(3).repeat_interleave(20, 0) + 0.05 * torch.randn(60, 3), dim=-1)
    q(data[None])
    assert bool(q.embedding.initted)
    # k-means found the three directions
    found = q.embedding.weight @ torch.eye(3).t()
    assert sorted(found.max(dim=0).values.tolist())[0] > 0.99

    before = q.embedding.weight.clone()
    size_before = q.cluster_size.clone()
    z = F.normalize(torch.randn(1, 10, 3), dim=-1)
    out = q(z)
    idx = out.indices.reshape(-1)
    counts = torch.bincount(idx, minlength=4).float()
    sums = torch.zeros(4, 3).index_add_(0, idx, z.reshape(-1, 3))
    candidate = torch.where(counts[:, None] > 0, F.normalize(sums / counts.clamp(min=1)[:, None], dim=-1), before)
    expected = F.normalize(0.9 * before + 0.1 * candidate, dim=-1)
    assert torch.allclose(q.embedding.weight, expected, atol=1e-6)
    assert torch.allclose(q.cluster_size, 0.9 * size_before + 0.1 * counts)
    assert torch.allclose(q.embedding.weight.norm(dim=-1), torch.ones(4))


def test_dead_codes_are_restarted_on_batch_vectors():
    config = VQKDConfig.tiny(codebook_size=6, code_dim=3, decay=0.5, dead_code_threshold=0.5)
    q = NormEMAVectorQuantizer(config).train()
    q.embedding.initted.fill_(True)
    with torch.no_grad():
        q.embedding.weight.copy_(F.normalize(torch.tensor(
            [[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0], [0, -1, 0], [0, 0, -1]]), dim=-1))
    q.cluster_size.fill_(1.0)
    data = F.normalize(torch.tensor([[1.0, 0.1, 0]]).repeat(8, 1), dim=-1)[None]  # all hit code 0
    restarted = 0
    for _ in range(3):
        restarted += q(data).num_restarted
    assert restarted >= 5
    # the dead codes now sit on data vectors
    assert (q.embedding.weight @ data[0, 0]).gt(0.99).sum() >= 5


def test_cosine_kmeans_keeps_empty_clusters():
    vectors = F.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0]]), dim=-1)
    centres, sizes = cosine_kmeans(vectors, 5, iters=3, generator=torch.Generator().manual_seed(0))
    assert centres.shape == (5, 2) and sizes.sum() == 3
    assert torch.allclose(centres.norm(dim=-1), torch.ones(5))


def test_step_zero_shapes_and_frozen_tokenizer_never_moves():
    config = VQKDConfig.tiny()
    model = VQKD(config)
    images = torch.rand(3, 3, 32, 32)
    targets = HOGTeacher(8)(images)
    out = model(images, targets, value_range="unit")
    assert out.indices.shape == (3, 16) and targets.shape == (3, 16, config.teacher_dim)
    assert 0.5 < out.reconstruction_loss.item() < 1.5
    out.loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0  # through the straight-through
    assert model.quantize.embedding.weight.grad is None
    frozen = VQKD(config).freeze()
    frozen.train()  # a parent's .train() must not make it learn
    weight = frozen.quantize.embedding.weight.clone()
    frozen(images, targets, value_range="unit")
    assert torch.equal(weight, frozen.quantize.embedding.weight) and not bool(frozen.quantize.embedding.initted)
    ids = frozen.get_codebook_indices(images * 2 - 1)
    assert torch.equal(ids, frozen.get_codebook_indices(images, value_range="unit"))


def _toy_images(count, generator):
    """Three coloured rectangles on a coloured background, 32 x 32."""
    background = torch.rand(count, 3, 1, 1, generator=generator)
    images = background.expand(count, 3, 32, 32).clone()
    for i in range(count):
        for _ in range(3):
            colour = torch.rand(3, generator=generator)
            top, left = torch.randint(0, 24, (2,), generator=generator).tolist()
            h, w = torch.randint(4, 14, (2,), generator=generator).tolist()
            images[i, :, top:top + h, left:left + w] = colour[:, None, None]
    return images


def test_codebook_usage_stays_high_on_a_toy_dataset():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    config = VQKDConfig.tiny(codebook_size=64, hidden_size=32, encoder_layers=1, num_heads=2)
    model, teacher = VQKD(config), HOGTeacher(8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    first = None
    for step in range(40):
        images = _toy_images(16, g)
        out = model(images, teacher(images), value_range="unit")
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = out.reconstruction_loss.item() if first is None else first
    model.eval()
    model.quantize.reset_usage()
    images = _toy_images(256, g)
    codes = model.get_codebook_indices(images, value_range="unit")
    used = torch.unique(codes).numel()
    # no collapse: 47 of 64 codes in use (the same run without restarts ends with 30)
    assert used >= 0.65 * config.codebook_size, used
    assert model.quantize.usage() == used / config.codebook_size
    with torch.no_grad():
        final = model(images, teacher(images), value_range="unit").reconstruction_loss.item()
    assert final < 0.6 * first, (first, final)


def test_hog_teacher_sees_orientation_and_colour():
    teacher = HOGTeacher(8)
    stripes = torch.zeros(2, 3, 8, 16)
    stripes[0, :, :, ::2] = 1.0  # vertical stripes -> horizontal gradients
    stripes[1, :, ::2, :] = 1.0  # horizontal stripes -> vertical gradients
    feats = teacher(stripes)  # (2, 2, 39)
    assert feats.shape == (2, 2, teacher.dim)
    cos = F.cosine_similarity(feats[0, 0, 3:], feats[1, 0, 3:], dim=0)
    assert cos < 0
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    assert torch.allclose(teacher(red)[0, 0, :3], torch.tensor([1.0, -1, -1]))


def _released_names(depth, decoder_depth, dim=64, code=16, codebook=32, teacher=24, grid=2, patch=16):
    """The key table of docs/pretraining.md section 4.4, with the shapes scaled down."""
    hidden = 4 * dim
    state = {}

    def vit(prefix, blocks, in_ch, p):
        state[f"{prefix}.cls_token"] = torch.randn(1, 1, dim)
        state[f"{prefix}.pos_embed"] = torch.randn(1, grid * grid + 1, dim)
        state[f"{prefix}.patch_embed.proj.weight"] = torch.randn(dim, in_ch, p, p)
        state[f"{prefix}.patch_embed.proj.bias"] = torch.randn(dim)
        for i in range(blocks):
            b = f"{prefix}.blocks.{i}"
            for n in ("norm1", "norm2"):
                state[f"{b}.{n}.weight"], state[f"{b}.{n}.bias"] = torch.ones(dim), torch.zeros(dim)
            state[f"{b}.attn.qkv.weight"] = torch.randn(3 * dim, dim) * 0.02
            state[f"{b}.attn.q_bias"], state[f"{b}.attn.v_bias"] = torch.randn(dim), torch.randn(dim)
            state[f"{b}.attn.proj.weight"], state[f"{b}.attn.proj.bias"] = torch.randn(dim, dim) * 0.02, torch.zeros(dim)
            state[f"{b}.mlp.fc1.weight"], state[f"{b}.mlp.fc1.bias"] = torch.randn(hidden, dim) * 0.02, torch.zeros(hidden)
            state[f"{b}.mlp.fc2.weight"], state[f"{b}.mlp.fc2.bias"] = torch.randn(dim, hidden) * 0.02, torch.zeros(dim)
        state[f"{prefix}.fc_norm.weight"], state[f"{prefix}.fc_norm.bias"] = torch.ones(dim), torch.zeros(dim)

    vit("encoder", depth, 3, patch)
    vit("decoder", decoder_depth, code, 1)
    state["quantize.embedding.weight"] = F.normalize(torch.randn(codebook, code), dim=-1)
    state["quantize.embedding.cluster_size"] = torch.zeros(codebook)
    state["quantize.embedding.embed_avg"] = torch.randn(codebook, code)
    state["quantize.embedding.initted"] = torch.tensor([True])
    state["quantize.cluster_size"] = torch.rand(codebook)
    for name, out in (("encode_task_layer", code), ("decode_task_layer", teacher)):
        state[f"{name}.0.weight"], state[f"{name}.0.bias"] = torch.randn(dim, dim) * 0.02, torch.zeros(dim)
        state[f"{name}.2.weight"], state[f"{name}.2.bias"] = torch.randn(out, dim) * 0.02, torch.zeros(out)
    # what the released file also carries and BEiT v2's loader drops
    state["teacher_model.visual.proj"] = torch.randn(dim, teacher)
    state["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    state["loss_fn.weight"] = torch.zeros(1)
    return state


def test_released_beitv2_key_names_load_strictly():
    state = _released_names(depth=2, decoder_depth=3)
    config = VQKDConfig.base(image_size=32, hidden_size=64, encoder_layers=2, num_heads=4)
    model = load_beitv2_tokenizer({"model": state}, config)
    assert model.config.decoder_layers == 3 and model.config.teacher_dim == 24
    assert model.config.codebook_size == 32 and model.config.code_dim == 16
    loaded = model.state_dict()
    for key, value in state.items():
        if key.startswith(("teacher", "scaling", "loss")) or key.endswith(("embed_avg", "embedding.cluster_size")):
            assert key not in loaded
        else:
            assert torch.allclose(loaded[key], value, atol=1e-6), key
    assert bool(model.quantize.embedding.initted)
    # a released tokenizer never re-runs k-means, even in training mode
    model.train()
    weight = model.quantize.embedding.weight.clone()
    model.quantize.update_codebook = False
    model(torch.rand(1, 3, 32, 32), torch.randn(1, 4, 24), value_range="unit")
    assert torch.equal(weight, model.quantize.embedding.weight)
    # input normalisation: [0, 1] images map to x * 2 - 1, as BEiT v2's pre_process
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.get_codebook_indices(images, value_range="unit"),
                       model.get_codebook_indices(images * 2 - 1))
    broken = dict(state)
    broken.pop("encoder.fc_norm.weight")
    with pytest.raises(ValueError, match="encoder.fc_norm.weight"):
        load_beitv2_tokenizer({"model": broken}, config)


def test_save_and_load_roundtrip(tmp_path):
    model = VQKD(VQKDConfig.tiny())
    model.quantize.embedding.initted.fill_(True)
    model.save_pretrained(tmp_path)
    again = VQKD.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])


def test_timm_teacher_from_a_local_file(tmp_path):
    import timm

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    torch.save(source.state_dict(), tmp_path / "teacher.pth")
    teacher = TimmTeacher("vit_tiny_patch16_224", tmp_path / "teacher.pth", input_size=32, img_size=32)
    feats = teacher(torch.rand(2, 3, 64, 64))  # resized to 32: a 2 x 2 grid
    assert feats.shape == (2, 4, teacher.dim)
    teacher.train()
    assert not teacher.model.training
