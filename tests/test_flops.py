"""FLOPs per training image, peaks and utilisation: counted by hand on a small network, the
table's chips by their vendors' names, and the report's arithmetic (eager, no device)."""

import pytest
import torch
from torch import nn

from retinanet_xla.config import load_config
from retinanet_xla.device.peaks import Peak, chip_of, measured_cpu_peak, table_peak
from retinanet_xla.device.runtime import Runtime
from retinanet_xla.training import flops as flops_module
from retinanet_xla.training.flops import Utilisation, training_flops, training_flops_per_image


def test_a_small_conv_net_costs_its_hand_count():
    """conv 3->8 (3x3, padding 1) on 16x16, ReLU, conv 8->4 (1x1), mean: 2 FLOP per
    multiply-add; backward computes the weight gradients of both convolutions and the input
    gradient of the second only (the images need none)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False))
    images = torch.randn(2, 3, 16, 16)
    conv1 = 2 * 8 * 3 * 3 * 3 * 16 * 16 * 2  # out channels x in x k x k x H x W, 2 FLOP per multiply-add, batch 2
    conv2 = 2 * 4 * 8 * 16 * 16 * 2
    forward = conv1 + conv2
    backward = conv1 + 2 * conv2  # conv1: weight gradient; conv2: weight and input gradients
    assert training_flops(net, lambda out: out.mean(), images) == forward + backward


def test_frozen_layers_cost_no_weight_gradient():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 4, 1, bias=False))
    net[0].requires_grad_(False)
    images = torch.randn(1, 3, 16, 16)
    conv1, conv2 = 2 * 8 * 27 * 256, 2 * 4 * 8 * 256
    assert training_flops(net, lambda out: out.mean(), images) == conv1 + conv2 + conv2  # conv2's weight gradient only


def test_the_smoke_model_costs_4_gflop_per_image_and_scales_with_pixels():
    small = training_flops_per_image(load_config("configs/smoke.yaml"))
    large = training_flops_per_image(load_config("configs/smoke.yaml", ["data.image_size=[256,256]"]))
    assert 3.9e9 < small < 4.05e9
    # 4x the pixels: 4x the convolutions (anchors and heads grow with the feature maps).
    assert large == pytest.approx(4 * small, rel=0.02)


def test_a_backbone_that_cannot_be_built_on_meta_is_built_on_the_host_without_touching_the_rng():
    """torchvision's RegNet reads its own initial values while it is built."""
    before = torch.get_rng_state()
    flops = training_flops_per_image(load_config("configs/smoke.yaml", ["model.backbone.name=regnet_y_400mf"]))
    assert 1e9 < flops < 1e10
    assert torch.equal(torch.get_rng_state(), before)  # exact resume restores the RNG: counting must not move it


def test_a_model_that_cannot_be_counted_reports_no_utilisation_and_warns(monkeypatch, caplog):
    def fails(*args):
        raise NotImplementedError("an op without a meta kernel\nsecond line")

    monkeypatch.setattr(flops_module, "_count", fails)
    assert training_flops_per_image(load_config("configs/smoke.yaml")) is None
    assert "could not count this model's FLOPs (an op without a meta kernel); utilisation is not reported" in caplog.text
    report = Utilisation(None, Peak(1.0, "x"), 1).report(10.0)
    assert report["train_flops_per_image"] is None and report["utilisation"] is None


def test_the_reference_model_at_640_costs_0_55_tflop_and_reads_no_weights_file():
    config = load_config("configs/640-3x.yaml", ["model.backbone.weights=/nonexistent/resnet50.pth"])
    assert 0.54e12 < training_flops_per_image(config) < 0.56e12


@pytest.mark.parametrize(
    "name, chip, bf16",
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989.0),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", "NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100", 312.0),
        ("NVIDIA L4", "NVIDIA L4", 121.0),
        ("NVIDIA L40S", "NVIDIA L40S", 362.0),
        ("v5litepod-8", "TPU v5e", 197.0),
        ("v5p-8", "TPU v5p", 459.0),
        ("v6e-8", "TPU v6e", 918.0),
        ("v4-8", "TPU v4", 275.0),
        ("v3-8", "TPU v3", 61.5),  # per core: each is a device
    ],
)
def test_the_table_knows_vendors_names(name, chip, bf16):
    peak = table_peak(name, "bf16")
    assert chip_of(name).name == chip and peak.tflops == bf16 and chip in peak.source


def test_an_unknown_device_or_precision_has_no_peak_and_says_how_to_give_one():
    assert chip_of("NVIDIA GeForce GTX 1080") is None
    unknown = table_peak("NVIDIA GeForce GTX 1080", "bf16")
    assert unknown.tflops is None and "--peak-tflops" in unknown.source
    tpu_fp32 = table_peak("v6e-8", "fp32")
    assert tpu_fp32.tflops is None and "no published fp32 peak" in tpu_fp32.source
    assert Runtime().peak("bf16").tflops is None  # a runtime that cannot name its device


def test_the_cpu_measures_its_own_peak_in_each_precision():
    fp32, bf16 = measured_cpu_peak("fp32", size=512, repeats=2), measured_cpu_peak("bf16", size=512, repeats=2)
    assert fp32.tflops > 0 and bf16.tflops > 0
    assert "512x512 fp32 matmul" in fp32.source and "bf16" in bf16.source


def test_utilisation_is_the_rate_per_device_over_the_peak():
    report = Utilisation(flops_per_image=int(0.5e12), peak=Peak(100.0, "given"), replicas=4).report(images_per_second=200.0)
    # 200 images/s over 4 devices x 0.5 TFLOP = 25 TFLOP/s per device, 25% of 100.
    assert report == {
        "train_flops_per_image": int(0.5e12),
        "achieved_tflops_per_device": 25.0,
        "peak_tflops_per_device": 100.0,
        "peak_source": "given",
        "utilisation": 0.25,
    }
    unknown = Utilisation(int(1e9), Peak(None, "unknown"), 1).report(10.0)
    assert unknown["utilisation"] is None and unknown["achieved_tflops_per_device"] == 0.01
    assert Utilisation(int(1e9), Peak(1.0, "x"), 1).report(None)["achieved_tflops_per_device"] is None
