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


def test_activation_checkpointing_keeps_outputs_and_gradients():
    import torch
    from imbalanceseglib.networks import UNet3DEnsemble, build_network, set_activation_checkpointing
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16, 16)
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        net = build_network("UNet3D", {"in_channels": 1, "out_channels": 3, "features": [4, 8, 16]})
        set_activation_checkpointing(net, on)
        assert net.checkpointing is on
        out = net(x)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    ens = set_activation_checkpointing(UNet3DEnsemble(1, 3, [4, 8]), True)
    assert all(m.checkpointing for m in ens.members)
    with torch.no_grad():  # inference is unaffected
        assert ens(x).shape == (2, 3, 16, 16, 16)


def test_training_config_records_checkpointing():
    import pytest
    from imbalanceseglib.training import TrainConfig
    from libtest_helpers import CLASSES
    cfg = TrainConfig.from_dict({"name": "m", "classes": CLASSES, "target_spacing": [1, 1, 1],
                                 "activation_checkpointing": True})
    assert cfg.to_dict()["activation_checkpointing"] is True
    cfg.activation_checkpointing = "yes"
    with pytest.raises(ValueError, match="activation_checkpointing must be true or false"):
        cfg.validate()
