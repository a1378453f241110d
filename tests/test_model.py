import json
import shutil

import pytest
import torch

from ptqd.errors import UserError
from ptqd.model import load_scheduler_config, load_denoiser, resolve_model
from tests.conftest import assert_user_error, run_cli


def test_builtin_model_loads_offline_as_a_diffusers_pipeline(builtin_source):
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline.from_pretrained(str(builtin_source.denoiser_dir.parent))
    assert pipe.unet.config.in_channels == 1
    assert builtin_source.builtin and builtin_source.extras_dir is not None
    assert len(builtin_source.sha256) == 64


def test_pipeline_folder_and_flat_unet_folder_give_the_same_model(model_copy, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(model_copy / "unet", flat)
    shutil.copy(model_copy / "scheduler" / "scheduler_config.json", flat)
    a, b = resolve_model(str(model_copy)), resolve_model(str(flat))
    assert a.sha256 == b.sha256 == resolve_model("digits").sha256
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 900.0])
    assert torch.equal(load_denoiser(a)(x, t).sample, load_denoiser(b)(x, t).sample)


@pytest.mark.parametrize("setup, fragment", [
    (lambda p: p / "missing", "neither a built-in model"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is a file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "is not a diffusers model"),
])
def test_bad_model_paths_are_one_sentence_errors(tmp_path, setup, fragment):
    with pytest.raises(UserError, match=fragment):
        resolve_model(str(setup(tmp_path)))


def _edit_json(path, **changes):
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def test_unsupported_unet_class_is_refused(model_copy):
    _edit_json(model_copy / "unet" / "config.json", _class_name="UNet3DConditionModel")
    with pytest.raises(UserError, match="UNet3DConditionModel is not supported"):
        resolve_model(str(model_copy))


def test_corrupted_weights_are_a_user_error(model_copy):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot load UNet weights"):
        load_denoiser(resolve_model(str(model_copy)))


def test_v_prediction_scheduler_is_refused(model_copy):
    _edit_json(model_copy / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    with pytest.raises(UserError, match="v_prediction"):
        load_scheduler_config(resolve_model(str(model_copy)))


def test_cli_reports_a_bad_model_in_one_line(tmp_path):
    result = run_cli("sample", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "x.npy"))
    assert_user_error(result, "neither a built-in model")
    assert not (tmp_path / "x.npy").exists()
