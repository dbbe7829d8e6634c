"""`iared.patch`: settings a policy cannot take are a ValueError, and the model keeps no policy."""

import pytest

import iared
from iared.backbones import create_model


def test_invalid_settings_are_value_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        create_model("vit_custom", embed_dim=10, num_heads=3)
    m = create_model("vit_custom", img_size=16, patch_size=4, embed_dim=8, depth=6, num_heads=2)
    for kw in ({"rho": 17.0}, {"rho": 0.0}, {"rho": True}, {"K": 0}, {"K": [4, 0, 4, 4]}, {"min_k": 0}):
        with pytest.raises(ValueError):
            iared.patch(m, "ats", **kw)
    with pytest.raises(ValueError, match="2 thresholds for 3 groups"):
        iared.patch(m, "iared", groups=3, threshold=[0.5, 0.5])
    assert m.policy is None
