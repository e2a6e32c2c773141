import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from retinanet_xla.models.retinanet import feature_sizes as retinanet_feature_sizes
from retinanet_xla.ops import AnchorGenerator


def test_corner_offset_with_rounding_matches_hand_computed_values():
    generator = AnchorGenerator(sizes=(32,), scales=(1.0,), aspect_ratios=(1.0, 2.0), offset=0.0)
    anchors = generator.grid_anchors((16, 16), [(2, 2)])
    # Aspect ratio is height / width: ratio 2 is w = 32 / sqrt(2) = 22.6, h = 45.3, halves rounded.
    expected = torch.tensor(
        [
            [-16, -16, 16, 16],
            [-11, -23, 11, 23],  # cell (y=0, x=0)
            [-8, -16, 24, 16],
            [-3, -23, 19, 23],  # cell (y=0, x=1): shifted by stride 8 in x
            [-16, -8, 16, 24],
            [-11, -15, 11, 31],  # cell (y=1, x=0)
            [-8, -8, 24, 24],
            [-3, -15, 19, 31],  # cell (y=1, x=1)
        ],
        dtype=torch.float32,
    )
    torch.testing.assert_close(anchors, expected)


def test_centred_offset_without_rounding_matches_hand_computed_values():
    generator = AnchorGenerator(sizes=(32,), scales=(1.0,), aspect_ratios=(1.0, 2.0), offset=0.5, torchvision_rounding=False)
    anchors = generator.grid_anchors((16, 16), [(2, 2)])
    half_w, half_h = 16 / math.sqrt(2), 16 * math.sqrt(2)
    assert anchors.shape == (8, 4)
    torch.testing.assert_close(anchors[0], torch.tensor([4 - 16, 4 - 16, 4 + 16, 4 + 16.0]))
    torch.testing.assert_close(anchors[1], torch.tensor([4 - half_w, 4 - half_h, 4 + half_w, 4 + half_h]))
    torch.testing.assert_close(anchors[7], torch.tensor([12 - half_w, 12 - half_h, 12 + half_w, 12 + half_h]))


def test_scales_are_truncated_like_torchvision_only_when_rounding():
    rounded = AnchorGenerator(sizes=(32,), aspect_ratios=(1.0,)).cell_anchors(0)
    exact = AnchorGenerator(sizes=(32,), aspect_ratios=(1.0,), torchvision_rounding=False).cell_anchors(0)
    # 32 * 2^(1/3) = 40.3 -> 40 and 32 * 2^(2/3) = 50.8 -> 50, as torchvision's int().
    assert rounded[:, 2].tolist() == [16.0, 20.0, 25.0]
    assert exact[:, 2].tolist() == pytest.approx([16.0, 16 * 2 ** (1 / 3), 16 * 2 ** (2 / 3)])


@pytest.mark.parametrize("image_size", [(128, 128), (96, 160), (100, 75)])
def test_default_anchors_equal_torchvision_retinanet_anchors(image_size):
    sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512])
    reference = TorchvisionAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    feature_sizes = retinanet_feature_sizes(image_size)
    features = [torch.zeros(1, 1, h, w) for h, w in feature_sizes]
    expected = reference(ImageList(torch.zeros(1, 3, *image_size), [image_size]), features)[0]
    ours = AnchorGenerator().grid_anchors(image_size, feature_sizes)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_anchor_generator_rejects_bad_configuration():
    with pytest.raises(ValueError, match="offset"):
        AnchorGenerator(offset=1.0)
    with pytest.raises(ValueError, match="positive"):
        AnchorGenerator(sizes=(0, 64))
    with pytest.raises(ValueError, match="3 feature levels"):
        AnchorGenerator().grid_anchors((64, 64), [(8, 8)] * 3)
