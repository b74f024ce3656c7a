import pytest
import torch

from imbalanceseglib.networks import UNet3D, build_network


def test_unet_output_shape_and_classes():
    net = build_network("UNet3D", {"in_channels": 1, "out_channels": 4, "features": [4, 8, 16]})
    y = net(torch.zeros(2, 1, 16, 24, 32))
    assert y.shape == (2, 4, 16, 24, 32)
    assert net.size_divisor == 4


@pytest.mark.parametrize("params, message", [
    ({"out_channels": 3, "features": [4, 8], "activation": "relu"}, "not accepted"),
    ({"out_channels": "3"}, "must be an integer"),
    ({"out_channels": 3, "features": [4, -8]}, "positive integers"),
    ({"out_channels": True}, "must be an integer"),
])
def test_build_network_rejects_bad_params(params, message):
    with pytest.raises(ValueError, match=message):
        build_network("UNet3D", params)


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="unknown network architecture 'os.system'"):
        build_network("os.system", {})


def test_unet_needs_two_levels():
    with pytest.raises(ValueError, match="two resolution levels"):
        UNet3D(1, 2, [8])
