import numpy as np
import pytest
import torch
from torch import nn

from ptqd.families.unets import UNET_KEEP as DEFAULT_KEEP
from ptqd.calibration.gpus import GPUS, gpu_spec
from ptqd.calibration.latency import estimate_step_latency, layer_seconds, same_cost
from ptqd.calibration.layers import FloatOps, LayerInfo, measure_float_ops, measure_layers
from ptqd.errors import UserError

NO_FLOAT_OPS = FloatOps(0, ())
# a 3x3 conv 320->320 at 64x64: per sample 64*64 outputs per channel, 320 * 3*3*320 MACs each
CONV_MACS = 64 * 64 * 320 * (3 * 3 * 320)            # 3,774,873,600
CONV = LayerInfo("mid.conv", "conv", CONV_MACS, params=320 * 320 * 9, in_elems=320 * 64 * 64,
                 out_elems=320 * 64 * 64)


def test_conv_roofline_on_h100_matches_the_hand_computation():
    h100 = gpu_spec("h100")     # 989.5 TFLOPS FP16, 1,979 TOPS INT8, 3.35 TB/s
    # INT8: 2 * 3,774,873,600 / 1,979e12 = 3.8149 us of compute; bytes = 921,600 weights
    # + 1,310,720 int8 inputs + 2 * 1,310,720 fp16 outputs = 4,853,760 -> 1.4489 us: compute-bound
    assert layer_seconds(CONV, "int8", 1, h100) == pytest.approx(3.8149e-6, rel=1e-4)
    # FP16: 2 * 3,774,873,600 / 989.5e12 = 7.6299 us; bytes = 2 * 921,600 + 2 * 1,310,720
    # + 2 * 1,310,720 = 7,086,080 -> 2.1152 us: compute-bound, twice the INT8 time
    assert layer_seconds(CONV, "fp16", 1, h100) == pytest.approx(7.6299e-6, rel=1e-4)


def test_small_linear_is_memory_bound_and_int8_halves_its_weight_traffic():
    h100 = gpu_spec("h100")
    linear = LayerInfo("time_proj", "linear", 1280 * 1280, params=1280 * 1280, in_elems=1280, out_elems=1280)
    # FP16: 2 * 1,638,400 weight bytes + 2 * 1280 in + 2 * 1280 out = 3,281,920 B / 3.35e12 = 0.97968 us
    # (the compute, 2 * 1,638,400 / 989.5e12 = 3.3 ns, is negligible)
    assert layer_seconds(linear, "fp16", 1, h100) == pytest.approx(0.97968e-6, rel=1e-4)
    # INT8: 1,638,400 + 1280 + 2 * 1280 = 1,642,240 B -> 0.49022 us
    assert layer_seconds(linear, "int8", 1, h100) == pytest.approx(0.49022e-6, rel=1e-4)


def test_w4a8_costs_what_w8a8_costs_and_fp8_beats_fp16_on_h100():
    lat = estimate_step_latency([CONV], NO_FLOAT_OPS, ["w8a8", "w4a8", "w4a4", "fp8"], (), gpu="h100")
    assert lat["w4a8"] == lat["w8a8"] == lat["w4a4"]      # all INT8 kernels on TensorRT
    assert lat["fp8"] < lat["fp16"] / 1.9                 # 1,979 vs 989.5 TFLOPS, compute-bound
    assert set(lat) == {"fp16", "w8a8", "w4a8", "w4a4", "fp8"}   # fp16 always there


def test_kept_layers_run_in_fp16_whatever_the_configuration():
    lat = estimate_step_latency([CONV], NO_FLOAT_OPS, ["w8a8"], ("mid.*",), gpu="h100")
    assert lat["w8a8"] == lat["fp16"]


def test_fp8_on_a100_is_a_user_error_naming_the_gpu():
    with pytest.raises(UserError, match="A100.*FP8"):
        estimate_step_latency([CONV], NO_FLOAT_OPS, ["fp8"], (), gpu="a100")
    assert "w8a8" in estimate_step_latency([CONV], NO_FLOAT_OPS, ["w8a8"], (), gpu="a100")


@pytest.mark.parametrize("gpu", ["v100", "", "h100x"])
def test_unknown_gpu_lists_the_known_ones(gpu):
    with pytest.raises(UserError, match="h100, h200, a100, l40s, b200, rtx5090, rtx4090"):
        estimate_step_latency([CONV], NO_FLOAT_OPS, ["w8a8"], (), gpu=gpu)


@pytest.mark.parametrize("config", ["fp32", "w8a16", "int8"])
def test_configurations_without_a_runtime_format_are_refused(config):
    with pytest.raises(UserError, match=config):
        estimate_step_latency([CONV], NO_FLOAT_OPS, [config], ())


def test_every_gpu_ranks_int8_above_fp16_on_a_compute_bound_layer():
    for name in GPUS:
        lat = estimate_step_latency([CONV], NO_FLOAT_OPS, ["w8a8"], (), batch=8, gpu=name)
        assert lat["w8a8"] < lat["fp16"], name


def test_same_cost_groups_configurations_within_one_percent():
    lat = {"fp16": 10.0, "w8a8": 6.0, "w4a8": 6.0, "w4a4": 6.05, "fp8": 6.2}
    assert same_cost(lat) == [["w4a8", "w8a8", "w4a4"]]
    assert same_cost({"fp16": 10.0, "w8a8": 6.0}) == []


class _Block(nn.Module):
    """conv -> GroupNorm -> SiLU -> dropout -> + skip conv -> / 1.0 -> reshape: a forward(x, t)
    like a UNet's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.act = nn.SiLU()
        self.drop = nn.Dropout(0.1)
        self.skip = nn.Conv2d(4, 8, 1)

    def forward(self, x, t):
        h = self.drop(self.act(self.norm(self.conv(x))))
        return ((h + self.skip(x)) / 1.0).reshape(x.shape[0], 8, 6, 6)


def test_measured_layer_sizes_and_float_traffic_of_a_small_block():
    block = _Block().eval()
    call = lambda module, x, t: module(x, t)   # not a diffusers denoiser: no family to ask
    layers = {layer.name: layer for layer in measure_layers(block, (4, 6, 6), call=call)}
    assert layers["conv"] == LayerInfo("conv", "conv", 8 * 36 * 4 * 9, 8 * 4 * 9, 4 * 36, 8 * 36)
    assert layers["skip"] == LayerInfo("skip", "conv", 8 * 36 * 4, 8 * 4, 4 * 36, 8 * 36)
    ops = measure_float_ops(block, (4, 6, 6), call=call)
    n = 8 * 36
    # GroupNorm reads n and its 8 + 8 affine weights, writes n; SiLU reads and writes n; the
    # add reads 2n, writes n; the convs, dropout (eval), the division by a constant (fused into
    # the add) and the reshape (a view) move nothing here
    assert ops.elems == (2 * n + 16) + 2 * n + 3 * n
    assert ops.attention == ()


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def test_measured_fields_of_a_diffusers_unet(tiny_unet):
    layers = {layer.name: layer for layer in measure_layers(tiny_unet, (1, 8, 8))}
    conv_in = layers["conv_in"]
    assert (conv_in.params, conv_in.in_elems, conv_in.out_elems) == (8 * 1 * 9, 1 * 64, 8 * 64)
    # the attention block runs at 4x4 (one downsample) with 16 channels: 16 tokens of 16
    to_q = layers["down_blocks.1.attentions.0.to_q"]
    assert (to_q.kind, to_q.macs, to_q.params, to_q.in_elems, to_q.out_elems) == (
        "linear", 16 * 16 * 16, 16 * 16, 16 * 16, 16 * 16)
    ops = measure_float_ops(tiny_unet, (1, 8, 8))
    cores = {c.name: c for c in ops.attention}
    core = cores["down_blocks.1.attentions.0"]
    # Q K^T: 16 x 16 scores of 16-long dot products; P V the same again
    assert core.macs == 2 * 16 * 16 * 16
    assert core.elems == 4 * 16 * 16          # Q, K, V read, output written
    assert "mid_block.attentions.0" in cores
    # GroupNorm and SiLU alone, at 8 channels x 64 pixels after conv_in, already exceed this
    assert ops.elems > 4 * 8 * 64


def test_cross_attention_cores_attend_over_the_text_tokens():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=24,
                                attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    text = {"encoder_hidden_states": np.zeros((1, 7, 24), np.float32)}     # 7 tokens of width 24
    cores = {c.name: c for c in measure_float_ops(unet, (4, 8, 8), text).attention}
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    # 8x8 = 64 queries of 16 channels; self-attention: 64 keys, cross-attention: the 7 tokens
    assert cores[f"{block}.attn1"].macs == 64 * 64 * (16 + 16)
    assert cores[f"{block}.attn2"].macs == 64 * 7 * (16 + 16)
    assert cores[f"{block}.attn2"].elems == 64 * 16 + 7 * (16 + 16) + 64 * 16


def test_builtin_model_w4a8_runs_at_w8a8_speed(builtin_unet):
    shape = (builtin_unet.config.in_channels, builtin_unet.config.sample_size, builtin_unet.config.sample_size)
    layers, ops = measure_layers(builtin_unet, shape), measure_float_ops(builtin_unet, shape)
    lat = estimate_step_latency(layers, ops, ["w8a8", "w4a8", "fp8"], DEFAULT_KEEP, batch=8, gpu="l40s")
    assert lat["w4a8"] == lat["w8a8"] < lat["fp16"]
    assert ["fp8", "w4a8", "w8a8"] in same_cost(lat)      # L40S: FP8 and INT8 both 733 T/s


# a DiT-XL/2-sized MLP projection at 512x512 (1024 tokens of 1152 -> 4608), per sample
MLP = LayerInfo("blocks.0.ff.net.0.proj", "linear", 1024 * 1152 * 4608, params=1152 * 4608,
                in_elems=1024 * 1152, out_elems=1024 * 4608)


def test_nvfp4_linear_runs_at_the_fp4_rate_on_b200_and_its_convolutions_at_fp8():
    b200 = gpu_spec("b200")     # FP16 2,250, FP8 4,500, FP4 9,000 dense; 8 TB/s
    # batch 8: 2 * 8 * 5,435,817,984 MACs / 9,000e12 = 9.663 us of compute; bytes = 5,308,416
    # weights x 0.5625 + 8 x 1,179,648 inputs x 0.5625 + 8 x 4,718,592 outputs x 2 = 83,791,872
    # -> 10.474 us: memory-bound even at FP4's rate
    assert layer_seconds(MLP, "nvfp4", 8, b200) == pytest.approx(83_791_872 / 8e12, rel=1e-6)
    lat = estimate_step_latency([MLP, CONV], NO_FLOAT_OPS, ["nvfp4", "fp8"], (), batch=8, gpu="b200")
    conv_fp8 = layer_seconds(CONV, "fp8", 8, b200) * 1e3
    assert lat["nvfp4"] == pytest.approx(layer_seconds(MLP, "nvfp4", 8, b200) * 1e3 + conv_fp8)
    assert lat["nvfp4"] < lat["fp8"] < lat["fp16"]


def test_w4a16_saves_weight_traffic_not_arithmetic():
    h100 = gpu_spec("h100")
    small = LayerInfo("time_proj", "linear", 1280 * 1280, params=1280 * 1280, in_elems=1280, out_elems=1280)
    # batch 1, memory-bound: 1,638,400 weights x (0.5 + 2/128) + 2 x 1280 + 2 x 1280 bytes
    assert layer_seconds(small, "int4-weight-only", 1, h100) == pytest.approx(
        (1_638_400 * (0.5 + 2 / 128) + 4 * 1280) / 3.35e12, rel=1e-6)
    # compute-bound: FP16's rate, exactly the FP16 layer's time
    assert layer_seconds(MLP, "int4-weight-only", 64, h100) == layer_seconds(MLP, "fp16", 64, h100)
    # its convolutions run FP16: a w4a16 step of convolutions alone costs the FP16 engine's
    lat = estimate_step_latency([CONV], NO_FLOAT_OPS, ["w4a16"], (), gpu="h100")
    assert lat["w4a16"] == lat["fp16"]


@pytest.mark.parametrize("gpu", ["h100", "h200", "a100", "l40s", "rtx4090"])
def test_nvfp4_before_blackwell_is_a_user_error_naming_the_gpu(gpu):
    with pytest.raises(UserError, match="no FP4 tensor cores.*Blackwell"):
        estimate_step_latency([MLP], NO_FLOAT_OPS, ["nvfp4"], (), gpu=gpu)


def test_a_linear_no_whole_block_wide_stays_fp16_in_the_estimate():
    """w4a16's blocks are 128 inputs: a 64-wide Linear is not quantized, and costs FP16."""
    narrow = LayerInfo("attn.to_q", "linear", 1024 * 64 * 64, params=64 * 64, in_elems=1024 * 64, out_elems=1024 * 64)
    wide = LayerInfo("ff", "linear", 1024 * 128 * 64, params=128 * 64, in_elems=1024 * 128, out_elems=1024 * 64)
    h100 = gpu_spec("h100")
    lat = estimate_step_latency([narrow], NO_FLOAT_OPS, ["w4a16"], (), gpu="h100")
    assert lat["w4a16"] == lat["fp16"]
    lat = estimate_step_latency([wide], NO_FLOAT_OPS, ["w4a16"], (), gpu="h100")
    assert lat["w4a16"] == pytest.approx(layer_seconds(wide, "int4-weight-only", 1, h100) * 1e3)
