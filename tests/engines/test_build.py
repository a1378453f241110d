"""The engines stage on a machine without TensorRT, and the TensorRT builder around a fake
`tensorrt` module (no real TensorRT can run here; tests using the fake say so in their names)."""
import json
import subprocess
import types

import pytest

from ptqd.engines.profiles import BatchProfile, input_shapes
from ptqd.engines.tensorrt import BuildSettings, EngineBuilder, strongly_typed_flag
from ptqd.errors import UserError
from ptqd.output import file_sha256
from tests.conftest import assert_user_error, run_cli


def test_explicit_tensorrt_backend_without_tensorrt_is_one_line_and_writes_nothing(exported, tmp_path):
    before = sorted(p.name for p in (exported / "engines").iterdir())
    assert_user_error(run_cli("build", str(exported), "--backend", "tensorrt", "--force"), "TensorRT is not installed")
    assert sorted(p.name for p in (exported / "engines").iterdir()) == before
    assert_user_error(run_cli("--backend", "tensorrt", "--output", str(tmp_path / "o"), entry="export-trt"),
                      "TensorRT is not installed")
    assert not (tmp_path / "o").exists()


def test_auto_backend_says_engines_were_not_built_and_writes_the_build_script(exported):
    assert "TensorRT engines NOT built" in (exported.parent / "export-trt.log").read_text()
    doc = json.loads((exported / "engines" / "onnxruntime.json").read_text())
    schedule = json.loads((exported / "scheduler" / "ptqd_schedule.json").read_text())
    configs = sorted({s["config"] for s in schedule["steps"]})
    assert sorted(doc["engines"]) == configs
    assert all(e["graph"].endswith(".cpu.onnx") for e in doc["engines"].values())
    assert not list((exported / "engines").glob("*.plan"))


def test_build_script_names_every_configuration_with_strong_typing_and_profiles(exported):
    script = (exported / "engines" / "build_engines.sh").read_text()
    schedule = json.loads((exported / "scheduler" / "ptqd_schedule.json").read_text())
    for config in {s["config"] for s in schedule["steps"]}:
        assert f"--onnx=onnx/unet_{config}.onnx" in script
        assert f"--saveEngine=engines/unet_{config}.plan" in script
    assert script.count("--stronglyTyped") == len({s["config"] for s in schedule["steps"]})
    assert "--minShapes=sample:1x1x16x16,timestep:1" in script
    assert "--maxShapes=sample:8x1x16x16,timestep:8" in script
    assert "--timingCacheFile=engines/timing.cache" in script and "nvcr.io/nvidia/tensorrt:" in script
    assert subprocess.run(["bash", "-n", str(exported / "engines" / "build_engines.sh")]).returncode == 0


def test_build_script_stops_clearly_without_trtexec(exported, tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(["bash", str(exported / "engines" / "build_engines.sh")], capture_output=True,
                            text=True, env=env)
    assert result.returncode != 0 and "trtexec not found" in result.stderr


def test_rebuild_needs_force(exported):
    assert_user_error(run_cli("build", str(exported)), "--force")


@pytest.mark.parametrize("text", ["8,4,1", "1,2", "a,b,c", "0,1,2"])
def test_bad_batch_profiles_are_refused(text):
    with pytest.raises(UserError, match="--batch"):
        BatchProfile.parse(text)


# ---- the builder around a fake tensorrt module ------------------------------------------

def _fake_tensorrt(version: str, strongly_typed_value: int | None, calls: list):
    trt = types.SimpleNamespace(__version__=version)
    flags = {"PREFER_JIT_PYTHON_PLUGINS": 2}
    if strongly_typed_value is not None:
        flags["STRONGLY_TYPED"] = strongly_typed_value
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+timed"

    class Config:
        builder_optimization_level = None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("pool", pool, size))

        def create_timing_cache(self, data):
            calls.append(("cache_in", data))
            self.cache = Cache(data)
            return self.cache

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            calls.append(("profile", profile.shapes))
            return 0

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("network_flags", flags))
            return object()

        def create_builder_config(self):
            self.config = Config()
            return self.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("opt_level", config.builder_optimization_level))
            return b"PLAN"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse", path))
            return True

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


def test_strongly_typed_flag_is_computed_for_tensorrt_10_and_11_with_fake_tensorrt():
    assert strongly_typed_flag(_fake_tensorrt("10.13.3", 1, [])) == 2
    assert strongly_typed_flag(_fake_tensorrt("11.1.0", 0, [])) == 1
    assert strongly_typed_flag(_fake_tensorrt("12.0", None, [])) == 0


def test_builder_with_fake_tensorrt_builds_each_config_sharing_the_timing_cache(exported, tmp_path):
    calls = []
    trt = _fake_tensorrt("10.13.3.9", 1, calls)
    settings = BuildSettings(BatchProfile(2, 4, 16), optimization_level=5)
    builder = EngineBuilder(settings, tmp_path / "timing.cache", trt)
    shapes = input_shapes([1, 16, 16], settings.profile)
    metas = [builder.build(exported / "onnx" / f"unet_{c}.onnx", tmp_path / f"unet_{c}.plan", c, shapes)
             for c in ("w4a8", "w8a8")]
    assert (tmp_path / "unet_w4a8.plan").read_bytes() == b"PLAN"
    assert [c for c in calls if c[0] == "network_flags"] == [("network_flags", 2)] * 2
    assert [c[1] for c in calls if c[0] == "cache_in"] == [b"", b"+timed"]  # second build reuses the first's
    profile = [c[1] for c in calls if c[0] == "profile"][0]
    assert profile["sample"] == ((2, 1, 16, 16), (4, 1, 16, 16), (16, 1, 16, 16))
    assert profile["timestep"] == ((2,), (4,), (16,))
    assert ("opt_level", 5) in calls
    meta = json.loads((tmp_path / "unet_w4a8.json").read_text())
    assert meta == metas[0]
    assert meta["tensorrt_version"] == "10.13.3.9" and meta["config"] == "w4a8"
    assert meta["source_onnx_sha256"] == file_sha256(exported / "onnx" / "unet_w4a8.onnx")
    assert meta["batch_profile"] == "2,4,16" and meta["strongly_typed"] is True
