"""DiT: shapes, adaLN-Zero initial identity, classifier-free guidance, label dropout, registry, checkpointing."""
import pytest
import torch

from kflow.vision import DiT, DiT_models


def tiny_dit(**kw):
    torch.manual_seed(0)
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, **kw)


def randomise(model):
    """Leave the zero init so outputs depend on every input."""
    torch.manual_seed(1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_output_shape_and_zero_output_at_init():
    model = tiny_dit(num_classes=10)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised final layer


def test_every_block_is_the_identity_at_init():
    model = tiny_dit(num_classes=10)
    h, c = torch.randn(3, 16, 32), torch.randn(3, 32)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)  # adaLN-Zero gates start at 0
    # ... and stops being the identity once the modulation is trained
    torch.nn.init.normal_(model.blocks[0].adaLN_modulation[-1].weight, std=0.1)
    assert not torch.allclose(model.blocks[0](h, c), h)


def test_patchify_unpatchify_and_shapes_for_other_patch_sizes():
    for p in (1, 2, 4):
        model = randomise(DiT(input_size=8, patch_size=p, in_channels=3, hidden_size=32, depth=1, num_heads=4))
        out = model(torch.randn(2, 3, 8, 8), torch.rand(2))
        assert out.shape == (2, 3, 8, 8)
        assert model.pos_embed.shape == (1, (8 // p) ** 2, 32)
    # unpatchify inverts the conv-order patch layout: token (i, j), channel c, offset (a, b) -> pixel (i·p+a, j·p+b)
    model = tiny_dit()
    tokens = torch.arange(16 * 4 * 4, dtype=torch.float32).reshape(1, 16, 2 * 2 * 4)
    img = model.unpatchify(tokens)
    assert img.shape == (1, 4, 8, 8)
    assert img[0, 1, 2 * 1 + 1, 2 * 3 + 0] == tokens[0, 1 * 4 + 3, (1 * 2 + 0) * 4 + 1]


def test_time_embedding_resolves_the_unit_interval():
    model = randomise(tiny_dit()).eval()
    x = torch.randn(1, 4, 8, 8)
    a, b = model(x, torch.tensor([0.50])), model(x, torch.tensor([0.51]))
    assert (a - b).abs().max() > 1e-3  # t ∈ [0, 1] is scaled before the sinusoidal features
    assert torch.allclose(model(x, torch.tensor(0.5)), a)  # a scalar t broadcasts


def test_cfg_scale_one_is_the_conditional_model_and_guidance_formula():
    model = randomise(tiny_dit(num_classes=5)).eval()
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(model.forward_with_cfg(x, t, y, 1.0), model(x, t, y))
    uncond = model(x, t, torch.full_like(y, 5))
    assert not torch.allclose(uncond, model(x, t, y))
    guided = model.forward_with_cfg(x, t, y, 3.0)
    assert torch.allclose(guided, uncond + 3.0 * (model(x, t, y) - uncond), atol=1e-5)
    assert torch.allclose(model(x, t), uncond)  # y=None is the null class


def test_label_dropout_only_in_training():
    model = randomise(tiny_dit(num_classes=3, class_dropout_prob=1.0))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    null = model.eval()(x, t, torch.tensor([3, 3]))
    assert torch.allclose(model.train()(x, t, y), null)  # every label dropped
    assert not torch.allclose(model.eval()(x, t, y), null)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = randomise(tiny_dit(num_classes=3, class_dropout_prob=0.0, gradient_checkpointing=ckpt)).train()
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        model(x, torch.tensor([0.2, 0.7]), torch.tensor([0, 2])).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_registry_and_input_checks():
    for name in ("DiT-S/2", "DiT-B/4", "DiT-L/2", "DiT-XL/8", "DiT-T/2", "DiT-M/1"):
        assert name in DiT_models
    small = DiT_models["DiT-S/2"](input_size=8, in_channels=4)
    assert len(small.blocks) == 12 and small.blocks[0].attn.num_heads == 6 and small.pos_embed.shape[-1] == 384
    model = tiny_dit()
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(1, 3, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match="divisible"):
        DiT(input_size=9, patch_size=2)
