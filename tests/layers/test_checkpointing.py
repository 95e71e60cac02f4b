import torch
from torch.distributed._composable import checkpoint

from beit3.config import Beit3Config
from beit3.layers import checkpoint_blocks
from beit3.models import Beit3Model

TINY = Beit3Config.from_preset("tiny")


def loss_and_grads(model: Beit3Model, images: torch.Tensor, ids: torch.Tensor):
    torch.manual_seed(3)  # the same drop-path draws in every run
    loss = model(images, ids).last_hidden_state.square().mean()
    model.zero_grad()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_blocks_give_the_same_loss_and_gradients():
    model = Beit3Model(TINY.replace(drop_path_rate=0.3)).train()
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 5))
    names = [name for name, _ in model.named_parameters()]
    plain_loss, plain_grads = loss_and_grads(model, images, ids)
    checkpoint_blocks(model.layers)
    assert all(checkpoint.state(block) is not None for block in model.layers)
    assert [name for name, _ in model.named_parameters()] == names  # the module tree is untouched
    loss, grads = loss_and_grads(model, images, ids)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=0, rtol=0, msg=name)


def test_checkpointing_twice_is_harmless():
    model = Beit3Model(TINY)
    checkpoint_blocks(model.layers)
    checkpoint_blocks(model.layers)  # the composable API alone would raise here
    model(torch.randn(1, 3, 32, 32)).last_hidden_state.sum().backward()
