"""Networks: shapes for any size and channel count, options, presets, determinism."""
import pytest
import torch

from recon.nets import PRESETS, build_network, count_parameters, describe_presets
from recon.nets.deep_decoder import DeepDecoder
from recon.nets.skip import SkipNet
from recon.nets.unet import UNet

torch.set_num_threads(1)

SMALL = ["tiny", "skip-small", "unet-small"]


@pytest.mark.parametrize("preset", SMALL)
@pytest.mark.parametrize("size", [32, 48, 64, 50, (37, 21)])
def test_output_size_equals_input_size(preset, size):
    h, w = (size, size) if isinstance(size, int) else size
    net = build_network(preset, 4, 3)
    out = net(torch.rand(1, 4, h, w))
    assert out.shape == (1, 3, h, w)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("preset", SMALL)
def test_channel_counts(preset, channels):
    net = build_network(preset, channels, channels)
    out = net(torch.rand(2, channels, 24, 24))
    assert out.shape == (2, channels, 24, 24)


def test_full_presets_keep_size_on_odd_images():
    # the paper networks downsample 5 times; a 50 px image must still come back 50 px
    for preset in ("skip", "unet"):
        net = build_network(preset, 2, 1, channels_down=8, channels_up=8) if preset == "skip" \
            else build_network(preset, 2, 1, channels=8)
        assert net(torch.rand(1, 2, 50, 45)).shape == (1, 1, 50, 45)


def test_sigmoid_auto_and_override():
    torch.manual_seed(0)
    z = 10 * torch.randn(1, 3, 32, 32)
    out = build_network("tiny", 3, 3)(z)
    assert out.min() >= 0 and out.max() <= 1
    # two output channels are MRI real/imag: no sigmoid, so values outside [0, 1] can appear
    out2 = build_network("tiny", 3, 2)(z)
    assert out2.min() < 0
    out_free = build_network("tiny", 3, 3, sigmoid=False)(z)
    assert out_free.min() < 0 or out_free.max() > 1


@pytest.mark.parametrize("upsampling", ["nearest", "bilinear"])
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_upsampling_and_norm_options(upsampling, norm):
    for preset in ("skip-small", "unet-small"):
        net = build_network(preset, 2, 2, upsampling=upsampling, norm=norm)
        out = net(torch.rand(1, 2, 40, 40))
        assert out.shape == (1, 2, 40, 40)
        kinds = {type(m).__name__ for m in net.modules()}
        expect = {"batch": "BatchNorm2d", "group": "GroupNorm"}.get(norm)
        if expect:
            assert expect in kinds
        else:
            assert not kinds & {"BatchNorm2d", "GroupNorm"}


def test_nearest_and_bilinear_give_different_outputs():
    z = torch.rand(1, 2, 32, 32)
    outs = []
    for mode in ("nearest", "bilinear"):
        torch.manual_seed(3)
        outs.append(build_network("skip-small", 2, 1, upsampling=mode)(z))
    assert not torch.allclose(outs[0], outs[1])


def test_group_norm_is_batch_independent():
    torch.manual_seed(0)
    net = build_network("skip-small", 2, 1, norm="group")
    z = torch.rand(2, 2, 32, 32)
    assert torch.allclose(net(z)[:1], net(z[:1]), atol=1e-6)


def test_determinism_with_seed():
    z = torch.rand(1, 3, 32, 32)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(build_network("skip-small", 3, 3)(z))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(124)
    assert not torch.equal(outs[0], build_network("skip-small", 3, 3)(z))


def test_gradients_reach_every_parameter():
    net = build_network("unet-small", 1, 1)
    net(torch.rand(1, 1, 32, 32)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_describe_presets_prints_positive_distinct_counts(capsys):
    counts = describe_presets(in_channels=32, out_channels=(1, 3))
    printed = capsys.readouterr().out
    assert set(counts) == set(PRESETS)
    for name, by_out in counts.items():
        assert name in printed and f"{by_out[3]:,}" in printed
        assert all(c > 0 for c in by_out.values())
        assert by_out[3] > by_out[1]  # the head grows with the output channels
    values = [by_out[3] for by_out in counts.values()]
    assert len(set(values)) == len(values)
    # Heckel & Hand's Deep Decoder (6 layers, 128 channels, RGB) has 100,224 parameters
    # (tutorial Sec. III-C1); the CT chapter's U-Net "roughly 3M" (Sec. 6.2)
    assert counts["deep-decoder"][3] == 100_224
    assert 2.5e6 < counts["unet"][1] < 3.5e6
    assert counts["tiny"][3] < counts["skip-small"][3] < counts["skip"][3]


def test_count_parameters_counts_trainable_only():
    net = build_network("tiny", 1, 1)
    total = count_parameters(net)
    assert total == sum(p.numel() for p in net.parameters())
    next(net.parameters()).requires_grad_(False)
    assert count_parameters(net) < total


def test_unknown_preset_and_override():
    with pytest.raises(ValueError, match="unknown network preset 'nope'.*skip.*tiny"):
        build_network("nope", 1, 1)
    with pytest.raises(ValueError, match="'tiny'.*unknown option.*widht"):
        build_network("tiny", 1, 1, widht=3)
    with pytest.raises(ValueError, match="upsampling='cubic'.*nearest, bilinear"):
        build_network("tiny", 1, 1, upsampling="cubic")
    with pytest.raises(ValueError, match="skip_channels has 4 entries; expected one per up step"):
        build_network("unet-small", 1, 1, skip_channels=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="out_channels must be a positive integer"):
        build_network("tiny", 1, 0)


def test_skip_structure_follows_ulyanov():
    net = SkipNet(32, 3, scales=5)
    assert len(net.levels) == 5
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(m.stride == (2, 2) for m in convs) == 5  # downsampling by stride-2 convolutions
    assert {m.kernel_size for m in convs} == {(1, 1), (3, 3)}
    assert any(isinstance(m, torch.nn.LeakyReLU) and m.negative_slope == 0.2 for m in net.modules())


def test_unet_without_skips_has_no_skip_branch():
    with_skip = UNet(1, 1, scales=3, channels=8, skip_channels=4)
    without = UNet(1, 1, scales=3, channels=8, skip_channels=0)
    assert count_parameters(without) < count_parameters(with_skip)
    assert without(torch.rand(1, 1, 20, 20)).shape == (1, 1, 20, 20)


@pytest.mark.parametrize("size", [(64, 64), (50, 37)])
def test_deep_decoder_input_and_output_shape(size):
    net = build_network("deep-decoder-small", 32, 3)
    shape = net.input_shape(*size)
    assert shape == (1, 32, -(-size[0] // 8), -(-size[1] // 8))  # 4 layers: 3 upsamplings
    out = net(torch.rand(shape))
    assert out.shape == (1, 3, *size)
    assert out.min() >= 0 and out.max() <= 1


def test_deep_decoder_is_pointwise_and_bilinear():
    net = DeepDecoder(16, 1, layers=3, channels=16)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.kernel_size == (1, 1) and m.bias is None for m in convs)
    ups = [m for m in net.modules() if isinstance(m, torch.nn.Upsample)]
    assert len(ups) == 2 and all(m.mode == "bilinear" for m in ups)
    with pytest.raises(ValueError, match="input_shape"):
        net(torch.rand(1, 16, 4, 4), output_size=(64, 64))


def test_dip_admm_preset_follows_the_thesis():
    """Thesis Sec. 3.3: n_u = n_d = [16, 32, 64, 128, 128], n_s = 0 (no skips), k_d = k_u = 3."""
    net = build_network("dip-admm", 3, 3)
    assert isinstance(net, SkipNet) and len(net.levels) == 5
    assert all(level.skip is None for level in net.levels)
    downs = [next(m for m in level.down.modules() if isinstance(m, torch.nn.Conv2d)) for level in net.levels]
    assert [c.out_channels for c in downs] == [16, 32, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) for c in downs)
    assert net(torch.rand(1, 3, 40, 40)).shape == (1, 3, 40, 40)


def test_unet_small_keeps_the_chapters_structure():
    """The CPU-sized U-Net keeps the chapter's layout (Sec. 6.2): skips only at the two lowest levels."""
    net = build_network("unet-small", 1, 1)
    skips = [block.skip is not None for block in net.up]  # coarsest up step first
    assert skips == [True, True, False]
