"""Every task model traces as one graph under ``torch.compile`` (issue 23, item 1).

``torch._dynamo.explain`` runs Dynamo's tracer only (no Inductor), so these checks are cheap. Inputs
are padded: padding is the path that builds key-padding masks, and under tracing padded and
unpadded text take the same code (the eager-only check `host_checks` is skipped), so padded alone
covers both. The loss paths (captioning's masked tokens, pretraining's masked tokens and patches)
are where shapes used to depend on the data.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from beit3.config import Beit3Config
from beit3.layers import caption_attention_mask
from beit3.models import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForPreTraining,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
    Beit3Model,
)
from beit3.models.captioning import captioning_loss
from beit3.models.dense import Beit3ForInstanceSegmentation, Beit3ForSemanticSegmentation
from beit3.models.pretraining import _stream_result

# One block each (tracing time grows with depth and every block runs the same code); the shared
# layout's only block is a vision-language one, so both of its FFN routes are traced.
LAYOUTS = {
    "decoupled": Beit3Config.from_preset("tiny", vocab_size=50, num_layers=1),
    "shared": Beit3Config.from_preset("tiny", vocab_size=50, num_layers=1, attention="shared", num_vl_layers=1),
}
BATCH, TEXT, PATCHES = 2, 8, 16  # 32 px images, 8 px patches


def assert_one_graph(fn, *args, **kwargs):
    dynamo.reset()
    try:
        result = dynamo.explain(fn)(*args, **kwargs)
    finally:
        dynamo.reset()
    reasons = [f"{b.reason} at {b.user_stack[-1] if b.user_stack else '?'}" for b in result.break_reasons]
    assert result.graph_break_count == 0, "\n".join(reasons)
    assert result.graph_count == 1


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(BATCH, 3, 32, 32, generator=g)
    ids = torch.randint(3, 49, (BATCH, TEXT), generator=g)
    padding = torch.ones(BATCH, TEXT, dtype=torch.long)
    padding[1, 5:] = 0
    return pixels, ids, padding


def vl_cases(layout):
    """(name, callable, args, kwargs): training cases take labels. The task heads differ only above
    the backbone, so they are traced in one layout; the attention layouts differ only inside it."""
    config = LAYOUTS[layout]
    pixels, ids, padding = inputs()
    masked = padding.bool() & (torch.arange(TEXT) % 2 == 0)
    captioning = Beit3ForCaptioning(config, mask_token_id=49)
    yield "captioning train", captioning.train(), (pixels, ids, padding), \
        {"labels": ids, "masked_positions": masked, "drop_worst_ratio": 0.25}
    if layout == "decoupled":
        yield "backbone eval", Beit3Model(config).eval(), (pixels, ids, padding), {}
        yield "captioning eval", captioning.eval(), (pixels, ids, padding), {}
        return
    retrieval = Beit3ForImageTextRetrieval(config)
    yield "vqa train", Beit3ForVisualQuestionAnswering(config, num_labels=5).train(), (pixels, ids, padding), \
        {"labels": torch.rand(BATCH, 5)}
    yield "nlvr2 train", Beit3ForVisualReasoning(config).train(), (torch.rand(BATCH, 2, 3, 32, 32), ids, padding), \
        {"labels": torch.tensor([0, 1])}
    yield "retrieval train", retrieval.train(), (pixels, ids, padding), {}
    yield "retrieval text eval", retrieval.eval().encode_text, (ids, padding), {}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vision_language_models_trace_as_one_graph(layout):
    for name, fn, args, kwargs in vl_cases(layout):
        try:
            assert_one_graph(fn, *args, **kwargs)
        except AssertionError as error:
            raise AssertionError(f"{layout} {name}: {error}") from None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pretraining_traces_as_one_graph(layout):
    config = LAYOUTS[layout]
    pixels, ids, padding = inputs()
    labels = torch.full((BATCH, TEXT), -100)
    labels[:, 1], labels[0, 3] = ids[:, 1], ids[0, 3]
    patches = torch.zeros(BATCH, PATCHES, dtype=torch.bool)
    patches[:, 2:5] = True
    codes = torch.randint(0, 16, (BATCH, PATCHES))
    model = Beit3ForPreTraining(config, visual_vocab_size=16).train()
    assert_one_graph(model, image_pixel_values=pixels, image_mask=patches, image_labels=codes,
                     text_input_ids=ids, text_attention_mask=padding, text_labels=labels,
                     pair_pixel_values=pixels, pair_input_ids=ids, pair_attention_mask=padding, pair_labels=labels,
                     pair_image_mask=patches, pair_image_labels=codes)


def test_image_models_trace_as_one_graph():
    config = LAYOUTS["decoupled"]
    pixels, _, _ = inputs()
    # two blocks with drop path: the training-mode random mask is traced too
    deeper = config.replace(num_layers=2, drop_path_rate=0.2)
    assert_one_graph(Beit3ForImageClassification(deeper, num_labels=5).train(), pixels, labels=torch.tensor([0, 1]))
    segmenter = Beit3ForSemanticSegmentation(config, num_labels=3, out_channels=32, window_size=2)
    assert_one_graph(segmenter.train(), pixels, labels=torch.randint(0, 3, (BATCH, 32, 32)))
    # Mask R-CNN's proposal and RoI heads are torchvision's (NMS, box filtering: data-dependent
    # shapes by nature); our part, backbone + feature pyramid, is one graph.
    detector = Beit3ForInstanceSegmentation(config, num_labels=3, out_channels=32)
    assert_one_graph(detector.feature_maps, pixels)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_cached_decoding_step_traces_as_one_graph(layout):
    torch.manual_seed(0)
    model = Beit3ForCaptioning(LAYOUTS[layout], mask_token_id=49).eval()
    pixels, _, _ = inputs()
    num_image = PATCHES + 1
    with torch.no_grad():
        out = model.beit3(pixels, torch.tensor([[0, 7, 49]]).expand(BATCH, 3),
                          attn_mask=caption_attention_mask(num_image, 3), use_cache=True)
        cache = out.past_key_values.truncate(num_image + 2)  # image, BOS, one word
        assert_one_graph(model.decode_step, torch.tensor([5, 6]), cache, 49, num_image)
        # and the step computes what recomputing the whole prefix does
        log_probs, grown = model.decode_step(torch.tensor([5, 6]), cache, 49, num_image)
        prefix = torch.tensor([[0, 7, 5, 49], [0, 7, 6, 49]])
        full = model.beit3(pixels, prefix, attn_mask=caption_attention_mask(num_image, 4))
    torch.testing.assert_close(log_probs, model._next_word_log_probs(full.last_hidden_state), atol=1e-5, rtol=1e-5)
    assert grown.length == num_image + 3


# ---- the fixed-shape losses equal the former data-dependent ones -------------------------------
def reference_captioning_loss(logits, targets, label_smoothing, drop_worst_ratio):
    """The loss as it was computed before (on the masked rows only, top-k of a data-dependent size)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    vocab, eps = log_probs.shape[-1], label_smoothing
    target = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    if eps > 0:
        other = eps / (vocab - 1)
        entropy = (1 - eps) * torch.log(torch.tensor(1 - eps)) + eps * torch.log(torch.tensor(other))
        per_token = entropy - ((1 - eps) * target + other * (log_probs.sum(-1) - target))
    else:
        per_token = -target
    if drop_worst_ratio > 0:
        keep = max(1, int(per_token.numel() * (1 - drop_worst_ratio)))
        per_token = per_token.topk(keep, largest=False).values
    return per_token.mean()


def test_fixed_shape_captioning_loss_equals_the_masked_rows_loss():
    g = torch.Generator().manual_seed(0)
    for trial in range(24):
        rows, length = 1 + trial % 4, 1 + trial % 11
        logits = (3 * torch.randn(rows, length, 37, generator=g)).requires_grad_()
        labels = torch.randint(0, 37, (rows, length), generator=g)
        mask = torch.rand(rows, length, generator=g) < 0.6
        mask.view(-1)[trial % mask.numel()] = True
        labels[~mask] = -100  # never read
        for eps in (0.0, 0.1):
            for ratio in (0.0, 0.1, 0.3, 0.5, 0.7):
                got = captioning_loss(logits, labels, eps, ratio, mask=mask)
                want = reference_captioning_loss(logits[mask], labels[mask], eps, ratio)
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
                if eps and trial % 3 == 0:
                    grad_got, = torch.autograd.grad(got, logits)
                    grad_want, = torch.autograd.grad(want, logits)
                    torch.testing.assert_close(grad_got, grad_want, atol=1e-6, rtol=1e-6)
    # a count whose product is not exact in float32 (10 * 0.7 rounds below 7 there): 7 tokens kept
    logits = torch.randn(1, 10, 5, generator=g)
    labels = torch.randint(0, 5, (1, 10), generator=g)
    torch.testing.assert_close(captioning_loss(logits, labels, 0.0, 0.3, mask=torch.ones(1, 10, dtype=torch.bool)),
                               reference_captioning_loss(logits[0], labels[0], 0.0, 0.3), atol=1e-6, rtol=1e-6)
    # nothing masked: a zero loss (formerly NaN), not an error
    assert captioning_loss(logits, labels, 0.1, 0.2, mask=torch.zeros(1, 10, dtype=torch.bool)).item() == 0.0


def test_dense_pretraining_stream_equals_the_masked_rows_stream():
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 40)
    hidden = torch.randn(3, 9, 16, generator=g)
    picked = torch.rand(3, 9, generator=g) < 0.3
    picked[0, 0] = True
    targets = torch.where(picked, torch.randint(0, 40, (3, 9), generator=g), torch.full((3, 9), -100))
    rows = _stream_result(head, hidden, picked, targets, dense=False)
    dense = _stream_result(head, hidden, picked, targets, dense=True)
    torch.testing.assert_close(dense.loss, rows.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dense.accuracy, rows.accuracy)
    assert dense.num_targets == rows.num_targets == int(picked.sum())
    torch.testing.assert_close(dense.logits, rows.logits)
    grad_dense = torch.autograd.grad(dense.loss, head.weight)[0]
    grad_rows = torch.autograd.grad(rows.loss, head.weight)[0]
    torch.testing.assert_close(grad_dense, grad_rows, atol=1e-6, rtol=1e-6)


def test_drop_path_rate_as_a_tensor_draws_the_same_distribution():
    """Compiled, a block reads its drop-path rate from a buffer (a graph input, so blocks of
    different rates share one graph): the mask is still 0 or 1 / keep, kept with probability keep."""
    from beit3.layers import drop_path_mask

    torch.manual_seed(0)
    like = torch.zeros(1)
    mask = drop_path_mask(20000, torch.tensor(0.25), True, like)
    assert mask.shape == (20000, 1, 1)
    torch.testing.assert_close(mask.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert abs((mask > 0).float().mean().item() - 0.75) < 0.02
    assert drop_path_mask(4, torch.tensor(0.25), False, like) is None
    block = Beit3Model(LAYOUTS["decoupled"].replace(num_layers=2, drop_path_rate=0.2)).layers[1]
    assert block.drop_path_rate.item() == pytest.approx(0.2) and block.has_drop_path
    assert "drop_path_rate" not in block.state_dict()  # not saved: checkpoints are unchanged


def test_off_cpu_the_pretraining_streams_take_the_fixed_shape_path(monkeypatch):
    """Where reading a mask back would stall the device (not eager CPU), the heads score every
    position (no boolean indexing); the loss is the row path's."""
    import beit3.models.pretraining as P

    config = LAYOUTS["decoupled"]
    pixels, ids, padding = inputs()
    labels = torch.full((BATCH, TEXT), -100)
    labels[:, 1] = ids[:, 1]
    model = Beit3ForPreTraining(config, visual_vocab_size=16).eval()
    rows = model(text_input_ids=ids, text_attention_mask=padding, text_labels=labels)
    calls = []
    real = P._stream_result
    monkeypatch.setattr(P, "host_checks", lambda tensor: False)
    monkeypatch.setattr(P, "_stream_result", lambda *a, dense: calls.append(dense) or real(*a, dense=dense))
    dense = model(text_input_ids=ids, text_attention_mask=padding, text_labels=labels)
    assert calls == [True]
    torch.testing.assert_close(dense.loss, rows.loss, atol=1e-6, rtol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_forward_passes_never_wait_for_the_gpu():
    """With CUDA's sync debug mode set to error, a padded VQA forward and a pretraining step run:
    no value is read back to the host."""
    cuda = torch.device("cuda")
    config = LAYOUTS["decoupled"]
    pixels, ids, padding = (t.to(cuda) for t in inputs())
    labels = torch.full((BATCH, TEXT), -100, device=cuda)
    labels[:, 1] = ids[:, 1]
    vqa = Beit3ForVisualQuestionAnswering(config, num_labels=5).to(cuda).eval()
    pretrain = Beit3ForPreTraining(config, visual_vocab_size=16).to(cuda).train()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        vqa(pixels, ids, padding)
        pretrain(text_input_ids=ids, text_attention_mask=padding, text_labels=labels).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
