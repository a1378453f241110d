"""The tiny conditional pipelines, and the float32 ONNX graphs of their text encoder and VAE decoder."""
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ptqd.builtin.tiny_pipelines import (IMAGE_SIZE, LATENT_CHANNELS, LATENT_SIZE, MAX_LENGTH, NULL_CLASS,
                                         NUM_CLASSES, build_tiny_pipeline)
from ptqd.runtime.layout import TEXT_OUTPUT, TOKENS_INPUT, VAE_INPUT, VAE_OUTPUT
from ptqd.exporter.pipeline_graphs import export_text_encoder, export_vae_decoder
from tests.conftest import assert_user_error

LATENT_SHAPE = (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
# Measured on 2 CPU cores (torch 2.13, onnxruntime 1.32), batch 1 and 3: text encoder max abs
# error 1.2e-6 (outputs up to ~3.4), VAE decoder 0.8e-6 to 1.4e-6 (outputs up to ~2);
# 1e-4 leaves about two orders of magnitude of margin.
PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    return build_tiny_pipeline("text", tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    return build_tiny_pipeline("class", tmp_path_factory.mktemp("tiny") / "tiny-ldm")


@pytest.fixture(scope="module")
def text_pipe(text_folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(text_folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def text_onnx(text_pipe, tmp_path_factory):
    from ptqd.families.text_encoders import TextEncoderOutputs
    from ptqd.families.unets import StableDiffusion

    module = TextEncoderOutputs(text_pipe.text_encoder, StableDiffusion.text_parts[0])
    return export_text_encoder(module, tmp_path_factory.mktemp("onnx") / "text_encoder.onnx", MAX_LENGTH)


@pytest.fixture(scope="module")
def vae_onnx(text_pipe, tmp_path_factory):
    return export_vae_decoder(text_pipe.vae, tmp_path_factory.mktemp("onnx") / "vae_decoder.onnx", LATENT_SHAPE)


def run_onnx(path, name, array):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {name: array})[0]


# --- the tiny pipelines -----------------------------------------------------------------------

def test_text_pipeline_loads_in_diffusers_and_makes_16x16_images(text_pipe):
    assert text_pipe.tokenizer.model_max_length == MAX_LENGTH
    # guidance_scale > 1: also runs the unconditional "" prompt, as a real SD call does
    out = text_pipe(["a red cat", "The Dog"], num_inference_steps=2, guidance_scale=5.0, output_type="np",
                    generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(out.images).all()


def test_class_pipeline_unet_takes_class_labels_and_vae_decodes(class_folder):
    from diffusers import AutoencoderKL, UNet2DModel

    index = json.loads((class_folder / "model_index.json").read_text())
    assert (index["num_classes"], index["null_class"]) == (NUM_CLASSES, NULL_CLASS)
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    unet = UNet2DModel.from_pretrained(str(class_folder / "unet")).eval()
    vae = AutoencoderKL.from_pretrained(str(class_folder / "vae")).eval()
    latents = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = unet(latents, torch.tensor([999.0, 1.0]), class_labels=torch.tensor([3, NULL_CLASS])).sample
        other = unet(latents, torch.tensor([999.0, 1.0]), class_labels=torch.tensor([4, 4])).sample
        images = vae.decode(latents / vae.config.scaling_factor).sample
    assert eps.shape == latents.shape
    assert not torch.allclose(eps, other)  # the label reaches the output
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_same_seed_same_weights(tmp_path, class_folder):
    again = build_tiny_pipeline("class", tmp_path / "again", seed=0)
    other = build_tiny_pipeline("class", tmp_path / "other", seed=1)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (again / weights).read_bytes() == (class_folder / weights).read_bytes()
    assert (other / weights).read_bytes() != (class_folder / weights).read_bytes()


def test_cli_refuses_a_non_empty_output_folder(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "ptqd.builtin.tiny_pipelines", "--kind", "text",
                             "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert_user_error(result, str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no staging folder left
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


# --- ONNX graphs ------------------------------------------------------------------------------

@pytest.mark.parametrize("graph, input_name, output_name, input_type", [
    ("text", TOKENS_INPUT, TEXT_OUTPUT, onnx.TensorProto.INT64),
    ("vae", VAE_INPUT, VAE_OUTPUT, onnx.TensorProto.FLOAT),
], ids=["text_encoder", "vae_decoder"])
def test_graph_interface(graph, input_name, output_name, input_type, text_onnx, vae_onnx):
    model = onnx.load(str(text_onnx if graph == "text" else vae_onnx))
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    assert [i.name for i in model.graph.input] == [input_name]
    assert [o.name for o in model.graph.output] == [output_name]
    assert model.graph.input[0].type.tensor_type.elem_type == input_type
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    for value in (model.graph.input[0], model.graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("batch", [1, 3])
def test_text_encoder_onnxruntime_matches_pytorch(text_pipe, text_onnx, batch):
    # Real token ids (BOS, words, EOS, padding) rather than random ones.
    prompts = ["a red cat", "", "the " * 20][:batch]
    ids = text_pipe.tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                              return_tensors="pt").input_ids
    with torch.no_grad():
        expected = text_pipe.text_encoder(ids)[0].numpy()
    got = run_onnx(text_onnx, TOKENS_INPUT, ids.numpy().astype(np.int64))
    assert got.shape == expected.shape == (batch, MAX_LENGTH, text_pipe.text_encoder.config.hidden_size)
    assert np.abs(got - expected).max() <= PARITY_ATOL


@pytest.mark.parametrize("batch", [1, 3])
def test_vae_decoder_onnxruntime_matches_pytorch(text_pipe, vae_onnx, batch):
    vae = text_pipe.vae
    latents = torch.randn(batch, *LATENT_SHAPE, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = vae.decode(latents / vae.config.scaling_factor).sample.numpy()
    got = run_onnx(vae_onnx, VAE_INPUT, latents.numpy())
    assert got.shape == expected.shape == (batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert np.abs(got - expected).max() <= PARITY_ATOL


def test_fp16_vae_decoder_for_tensorrt_keeps_the_interface_and_stays_close(text_pipe, tmp_path):
    """The FP16 copy TensorRT builds: FP16 weights, float32 input and output, within FP16
    rounding of the FP32 model (measured with onnxruntime: max abs error ~1e-3 on outputs up to ~2)."""
    vae = text_pipe.vae
    latents = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = vae.decode(latents / vae.config.scaling_factor).sample.numpy()
    path = export_vae_decoder(vae, tmp_path / "vae_decoder.fp16.onnx", LATENT_SHAPE, half=True)
    model = onnx.load(str(path))
    assert {w.data_type for w in model.graph.initializer if len(w.dims) > 1} == {onnx.TensorProto.FLOAT16}
    assert [i.type.tensor_type.elem_type for i in model.graph.output] == [onnx.TensorProto.FLOAT]
    err = np.abs(run_onnx(path, VAE_INPUT, latents.numpy()) - expected).max()
    print(f"fp16 VAE decoder max abs error {err:.2e}")
    assert 0 < err < 0.02
    assert next(vae.parameters()).dtype == torch.float32  # the model itself untouched
