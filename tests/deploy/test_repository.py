"""The Triton model repository written by export-trt / `ptqd deploy`: layout, configs that
Triton's own schema accepts, and the TensorRT flavour (with stand-in plan files: TensorRT
cannot run here)."""
import json
import re
import shutil

import pytest

from ptqd.deploy.model_config import parse_config
from ptqd.deploy.repository import SAMPLER
from ptqd.output import file_sha256
from tests.conftest import assert_user_error, run_cli


def _models(repo):
    return {p.parent.name: parse_config(p.read_text()) for p in repo.glob("*/config.pbtxt")}


def test_export_writes_a_repository_triton_can_load(exported):
    repo = exported / "triton"
    models = _models(repo)
    assert set(models) == {SAMPLER}  # no plans here: the sampler runs onnxruntime in-process
    for name, config in models.items():
        assert config.name == name
        versions = [p for p in (repo / name).iterdir() if p.is_dir()]
        assert [p.name for p in versions] == ["1"]  # Triton's <model>/<version>/ layout
        assert (repo / name / "1" / "model.py").is_file()
    sampler = models[SAMPLER]
    assert sampler.backend == "python"
    assert [i.name for i in sampler.input] == ["seed", "num_images", "first_index"]
    assert sampler.parameters["unets"].string_value == "in-process"
    version = repo / SAMPLER / "1"
    schedule = json.loads((exported / "scheduler" / "ptqd_schedule.json").read_text())
    assert json.loads((version / "ptqd_schedule.json").read_text()) == schedule
    configs = sorted({s["config"] for s in schedule["steps"]})
    assert sorted(p.name for p in (version / "onnx").iterdir()) == [f"unet_{c}.cpu.onnx" for c in configs]
    # the runtime the model imports travels with it, and it is torch-free
    modules = list((version / "ptqd").rglob("*.py"))
    assert {m.name for m in modules} >= {"sampler.py", "noise.py", "schedule.py", "onnxruntime.py"}
    for module in modules:
        assert not re.search(r"^\s*(import|from) (torch|diffusers|click)\b", module.read_text(), re.M), module


def test_schema_check_rejects_what_triton_would(exported):
    text = (exported / "triton" / SAMPLER / "config.pbtxt").read_text()
    parse_config(text)
    with pytest.raises(Exception, match="max_batch_sizes"):
        parse_config(text.replace("backend:", "max_batch_sizes: 4\nbackend:"))
    with pytest.raises(Exception, match="KIND_CPUS"):
        parse_config(text.replace("KIND_CPU", "KIND_CPUS"))


def test_verify_names_a_broken_config(exported_copy):
    path = exported_copy / "triton" / SAMPLER / "config.pbtxt"
    path.write_text(path.read_text().replace("KIND_CPU", "KIND_CPUS"))
    result = run_cli("verify", str(exported_copy))
    assert result.returncode == 1
    assert f"triton/{SAMPLER}/config.pbtxt: Triton would reject it" in result.stdout


def test_verify_notices_a_repository_older_than_its_graphs(exported_copy):
    """Graphs re-exported without a redeploy: the repository would serve the old ones."""
    copy = exported_copy / "triton" / SAMPLER / "1" / "onnx" / "unet_w4a8.cpu.onnx"
    copy.unlink()  # break the hard link, then change the copy only
    shutil.copyfile(exported_copy / "onnx" / "unet_w8a8.cpu.onnx", copy)
    result = run_cli("verify", str(exported_copy))
    assert result.returncode == 1
    assert "unet_w4a8.cpu.onnx: differs from onnx/unet_w4a8.cpu.onnx" in result.stdout


def _fake_plans(out, configs, profile="1,4,8"):
    """Stand-ins for TensorRT plans (none can be built here) with the metadata the engines
    stage writes beside real ones."""
    for cfg in configs:
        (out / "engines" / f"unet_{cfg}.plan").write_bytes(f"not a real plan {cfg}".encode())
        onnx = out / "onnx" / f"unet_{cfg}.onnx"
        meta = {"source_onnx": onnx.name, "source_onnx_sha256": file_sha256(onnx), "batch_profile": profile,
                "tensorrt_version": "10.x", "configuration": cfg}
        (out / "engines" / f"unet_{cfg}.json").write_text(json.dumps(meta))


def test_deploy_with_plans_mock_tensorrt(exported_copy):
    out = exported_copy
    configs = sorted({s["config"] for s in json.loads((out / "scheduler" / "ptqd_schedule.json").read_text())["steps"]})
    _fake_plans(out, configs)
    result = run_cli("deploy", str(out), "--force")
    assert result.returncode == 0, result.stderr
    models = _models(out / "triton")
    assert set(models) == {SAMPLER, *(f"unet_{c}" for c in configs)}
    assert models[SAMPLER].parameters["unets"].string_value == "bls"
    assert not (out / "triton" / SAMPLER / "1" / "onnx").exists()
    for cfg in configs:
        unet = models[f"unet_{cfg}"]
        assert unet.platform == "tensorrt_plan" and unet.max_batch_size == 8
        assert [i.name for i in unet.input] == ["sample", "timestep"]
        assert list(unet.input[0].dims) == [1, 16, 16]
        assert unet.instance_group[0].kind == unet.instance_group[0].KIND_GPU
        assert list(unet.instance_group[0].profile) == ["0"]
        plan = out / "triton" / f"unet_{cfg}" / "1" / "model.plan"
        assert plan.read_bytes() == (out / "engines" / f"unet_{cfg}.plan").read_bytes()
    result = run_cli("verify", str(out))
    assert result.returncode == 0, result.stdout


def test_deploy_tensorrt_without_plans_is_one_line(exported_copy):
    before = file_sha256(exported_copy / "triton" / SAMPLER / "config.pbtxt")
    result = run_cli("deploy", str(exported_copy), "--unets", "tensorrt", "--force")
    assert_user_error(result, "--unets tensorrt", "unet_w4a8.plan")
    assert file_sha256(exported_copy / "triton" / SAMPLER / "config.pbtxt") == before
    assert not list(exported_copy.glob(".triton*"))


def test_deploy_does_not_overwrite_without_force(exported_copy):
    assert_user_error(run_cli("deploy", str(exported_copy)), "triton exists", "--force")


def test_plans_with_a_minimum_batch_mock_tensorrt(exported_copy):
    """A profile 2..8: Triton's TensorRT backend rejects a batch of 1, so the sampler is told
    to pad (MinBatch) and the UNet models batch up to 8."""
    configs = ["w4a8", "w8a8"]
    _fake_plans(exported_copy, configs, profile="2,4,8")
    assert run_cli("deploy", str(exported_copy), "--force").returncode == 0
    models = _models(exported_copy / "triton")
    assert models[SAMPLER].parameters["min_batch"].string_value == "2"
    assert models[SAMPLER].parameters["batch"].string_value == "8"
    assert all(models[f"unet_{c}"].max_batch_size == 8 for c in configs)


def test_deploy_mistakes_are_one_line_and_leave_the_repository(exported_copy):
    before = file_sha256(exported_copy / "triton" / SAMPLER / "config.pbtxt")
    assert_user_error(run_cli("deploy", str(exported_copy), "--unets", "bogus"), "--unets 'bogus'")
    (exported_copy / "onnx" / "unet_w8a8.cpu.onnx").unlink()
    assert_user_error(run_cli("deploy", str(exported_copy), "--force"), "unet_w8a8.cpu.onnx is missing")
    (exported_copy / "engines" / "onnxruntime.json").write_text("{not json")
    assert_user_error(run_cli("deploy", str(exported_copy), "--force"), "onnxruntime.json has no readable batch_profile")
    assert file_sha256(exported_copy / "triton" / SAMPLER / "config.pbtxt") == before
    assert not list(exported_copy.glob(".triton*"))


def test_client_mistakes_are_one_line(tmp_path):
    out = str(tmp_path / "x.npy")
    assert_user_error(run_cli("client", "--url", "127.0.0.1:99999", "--output", out), "host:port")
    assert_user_error(run_cli("client", "--url", "http://127.0.0.1:8000", "--output", out), "without a scheme")
    assert_user_error(run_cli("client", "--url", "127.0.0.1:1", "--output", out), "cannot reach a Triton server")
    assert_user_error(run_cli("client", "--seed", str(2**64), "--output", out), "--seed")
    assert_user_error(run_cli("client"), "nothing to write")
    assert not (tmp_path / "x.npy").exists()
