"""The format registry (runtime/formats.py): a configuration's name, bits, ONNX types, the
kernel it runs on TensorRT and where its CPU graph lives are read from one place."""
import pytest

from ptqd.calibration.configs import BitConfig, candidate_configs
from ptqd.errors import UserError
from ptqd.runtime.formats import BASE_FORMATS, FORMATS, config_kernel, parse_config
from ptqd.runtime.layout import graph_path


@pytest.mark.parametrize("name, fmt, kernels, types", [
    ("w4a8", "int", ("int8", "int8"), {False: ("INT8", "INT8"), True: ("INT4", "INT8")}),
    ("w4a4", "int", ("int8", "int8"), {False: ("INT8", "INT8"), True: ("INT4", "INT4")}),
    ("w8a8", "int", ("int8", "int8"), {False: ("INT8", "INT8"), True: ("INT8", "INT8")}),
    ("fp8", "fp8", ("fp8", "fp8"), {False: ("FLOAT8E4M3FN",) * 2, True: ("FLOAT8E4M3FN",) * 2}),
    # weight-only: INT4 in every flavour (TensorRT's INT4 is exactly that), convolutions FP16
    ("w4a16", "w4a16", ("fp16", "int4-weight-only"), {False: ("INT4", None), True: ("INT4", None)}),
    # NVFP4 Linear layers, FP8 convolutions (TensorRT has no FP4 convolution)
    ("nvfp4", "nvfp4", ("fp8", "nvfp4"), {False: ("FLOAT4E2M1",) * 2, True: ("FLOAT4E2M1",) * 2}),
])
def test_a_configuration_says_its_kernels_and_onnx_types(name, fmt, kernels, types):
    parsed, weight_bits, act_bits = parse_config(name)
    config = BitConfig.parse(name)
    assert (parsed.name, config.fmt, config.name) == (fmt, fmt, name)
    # 4-bit weights run INT8 kernels on TensorRT: no 4-bit convolution, W4A8 GEMMs stay INT8
    assert (config_kernel(name, "conv"), config_kernel(name, "linear")) == (config.kernel("conv"), config.kernel()) \
        == kernels
    for int4, expected in types.items():
        assert parsed.onnx_types(weight_bits, act_bits, int4, int4) == expected
    if parsed.weight_grid.kind == "e2m1":   # ONNX Runtime's stand-in holds FP4 values in E4M3
        assert parsed.onnx_types(weight_bits, act_bits, True, True, fp4=False) == ("FLOAT8E4M3FN",) * 2


def test_formats_give_convolutions_their_own_format_where_tensorrt_has_no_4bit_conv():
    nvfp4, w4a16 = BitConfig.parse("nvfp4"), BitConfig.parse("w4a16")
    assert nvfp4.for_kind("conv").name == "fp8" and nvfp4.for_kind("linear") is nvfp4
    assert not w4a16.for_kind("conv").quantized and w4a16.for_kind("linear") is w4a16
    assert w4a16.weight_layout.block == 128 and w4a16.act_layout is None
    assert nvfp4.weight_layout.block == nvfp4.act_layout.block == 16 and nvfp4.weight_layout.scale == "e4m3"
    # --bits 4 --act-bits 16 with the integer format is the weight-only configuration
    assert BitConfig.of_format("int", 4, 16) == w4a16


def test_the_float_engine_runs_fp16_and_shares_the_fp32_graph_on_the_cpu(tmp_path):
    assert config_kernel("fp16") == "fp16" and not BitConfig.parse("fp16").quantized
    assert graph_path(tmp_path, "fp16", "onnxruntime").name == "unet_fp32.onnx"
    assert graph_path(tmp_path, "fp16", "tensorrt").name == "unet_fp16.onnx"
    # onnxruntime has no FP8 kernels: fp8's CPU-fast graph is its reference graph
    assert graph_path(tmp_path, "fp8", "cpu-fast").name == "unet_fp8.ort.onnx"
    assert graph_path(tmp_path, "w4a8", "cpu-fast").name == "unet_w4a8.cpu.onnx"


def test_mixed_schedules_step_up_as_each_format_says():
    names = lambda base: [c.name for c in candidate_configs(BitConfig.parse(base))]
    assert names("w4a8") == ["w4a8", "w8a8"] and names("w8a8") == ["w8a8"]
    assert sorted(names("fp8")) == ["fp16", "fp8"]
    assert sorted(names("nvfp4")) == ["fp8", "nvfp4"] and sorted(names("w4a16")) == ["fp16", "w4a16"]


@pytest.mark.parametrize("name, message", [("w3a8", "weight bits 3"), ("w8a16", "activation bits 16"),
                                           ("fp4", "not a configuration"), ("int8", "not a configuration"),
                                           ("w4a2", "activation bits 2")])
def test_a_configuration_no_format_has_is_refused_in_one_line(name, message):
    with pytest.raises(UserError, match=message):
        parse_config(name)


def test_only_quantizing_formats_named_by_the_format_may_be_a_base():
    # w4a16 is reached by its bits (--bits 4 --act-bits 16), not by --format
    assert BASE_FORMATS == ("int", "fp8", "nvfp4")
    assert all(FORMATS[n].quantized for n in BASE_FORMATS)
