"""hooked_vit.preprocess' pixel-space helpers: normalisation both ways, constant images, one Gaussian blur."""

import torch
import torch.nn.functional as F

from hooked_vit.preprocess import constant_image, gaussian_blur, normalize, unnormalize

CFG = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def test_normalize_round_trip_and_constant_images():
    unit = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(unnormalize(normalize(unit, CFG), CFG), unit)
    black = constant_image(0.0, (8, 8), CFG, batch=2)
    assert black.shape == (2, 3, 8, 8)
    torch.testing.assert_close(black[0, :, 0, 0], -torch.tensor(CFG["mean"]) / torch.tensor(CFG["std"]))
    grey = constant_image(0.5, (4, 4), {"mean": (0.5,), "std": (0.5,)})
    assert grey.abs().max() == 0


def test_gaussian_blur_zero_padding_equals_the_2d_kernel():
    """Separable with zeros outside equals RISE's 11x11 2-D kernel with zero padding (to float rounding)."""
    x = torch.randn(2, 3, 20, 20)
    r = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-(r**2) / 50.0)
    k = torch.outer(g, g) / torch.outer(g, g).sum()
    ref = F.conv2d(x, k.expand(3, 1, 11, 11), padding=5, groups=3)
    torch.testing.assert_close(gaussian_blur(x, 5.0, 11, "zeros"), ref, atol=1e-6, rtol=0)
    flat = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, 10.0), flat)  # reflect padding keeps a constant image
