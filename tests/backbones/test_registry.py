"""The model registry (`iared.backbones.registry`): every registered backbone runs forward and
backward, the required names are registered."""

import pytest
import torch

from iared.backbones import create_model, list_models


IMAGE_MODELS = [n for n in list_models() if not n.startswith(("jointst", "timesformer"))]


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_every_model_forward_backward(name):
    # One block is enough to exercise every layer type at the real width and resolution.
    m = create_model(name, depth=1)
    c = m.config
    size = c.img_size if isinstance(c.img_size, int) else c.img_size[0]
    x = torch.randn(1, c.in_chans, size, size)
    out = m(x)
    assert out.shape == (1, c.num_classes)
    out.sum().backward()
    assert m.pos_embed.grad is not None


def test_required_names_are_registered():
    names = set(list_models())
    for size in ("tiny", "small", "base"):
        assert f"vit_{size}_patch16_224" in names
        assert f"deit_{size}_patch16_224" in names
        assert f"deit_{size}_distilled_patch16_224" in names
    assert "deit_base_patch16_384" in names
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet50")
