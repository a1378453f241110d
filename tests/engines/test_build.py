"""The engines stage on a machine without TensorRT, and the TensorRT builder around a fake
`tensorrt` module (no real TensorRT can run here; tests using the fake say so in their names)."""
import json
import subprocess
import sys
import types

import numpy as np
import pytest

from ptqd.engines.build_script import value_ranges
from ptqd.engines.profiles import BatchProfile, input_shapes
from ptqd.engines.tensorrt import BuildSettings, EngineBuilder, strongly_typed_flag
from ptqd.engines.timing import measured_latencies
from ptqd.errors import UserError
from ptqd.output import file_sha256
from ptqd.verify import verify
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


def test_build_script_checks_and_times_every_plan_at_the_opt_batch(exported):
    script = (exported / "engines" / "build_engines.sh").read_text()
    configs = sorted({s["config"] for s in json.loads((exported / "scheduler" / "ptqd_schedule.json").read_text())["steps"]})
    for config in configs:
        # against the ONNX Runtime reference graph (the fake-quant twin), on opt-batch inputs
        assert (f"check_plan unet_{config} unet_{config}.ort.onnx 'sample:[4,1,16,16] timestep:[4]' "
                f"'sample:[-2.0,2.0] timestep:[0,999]'") in script
        assert f"time_plan unet_{config} {config} 4 sample:4x1x16x16,timestep:4" in script
    # checks and timings come after every build
    assert script.rindex("--saveEngine=") < script.index("\ncheck_plan ") < script.index("\ntime_plan ")


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


# ---- the build script's check and timing, run with stand-ins for trtexec and polygraphy ----

FAKE_TRTEXEC = """#!/usr/bin/env bash
echo "trtexec $*" >> "$CALLS"
for a in "$@"; do
  case "$a" in
    --saveEngine=*) echo plan > "${a#--saveEngine=}";;
    --loadEngine=*unet_w4a8.plan) median=0.8125;;
    --loadEngine=*) median=1.5;;
  esac
done
if [ -n "${median:-}" ]; then
  echo "[12/01/2026-10:00:00] [I] Latency: min = 1 ms, max = 3 ms, mean = 2 ms, median = 9.99 ms, percentile(90%) = 3 ms"
  echo "[12/01/2026-10:00:00] [I] GPU Compute Time: min = 0.5 ms, max = 2 ms, mean = 1 ms, median = $median ms, percentile(90%) = 2 ms, percentile(95%) = 2 ms, percentile(99%) = 2 ms"
fi
"""

FAKE_POLYGRAPHY = """#!/usr/bin/env bash
echo "polygraphy $*" >> "$CALLS"
prev=
for a in "$@"; do
  case "$prev" in --save-inputs|--save-outputs) echo "[]" > "$a";; esac
  prev=$a
done
case " $* " in
  *" engines/${FAIL_PLAN:-none}.plan "*) echo "[E]     FAILED | Mismatched outputs: ['noise_pred']"; exit 1;;
esac
"""


def _run_build_script(out, tmp_path, polygraphy=True, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tools = {"trtexec": FAKE_TRTEXEC, "python3": f'#!/bin/sh\nexec "{sys.executable}" "$@"\n'}
    if polygraphy:
        tools["polygraphy"] = FAKE_POLYGRAPHY
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # the TensorRT container's Python module, as far as the script asks it (its version)
    fake_py = tmp_path / "fake_python"
    fake_py.mkdir(exist_ok=True)
    (fake_py / "tensorrt.py").write_text('__version__ = "10.fake"\n')
    calls = tmp_path / "calls.log"
    calls.write_text("")
    result = subprocess.run(["bash", str(out / "engines" / "build_engines.sh")], capture_output=True, text=True,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls),
                                 "PYTHONPATH": str(fake_py), **env})
    return result, calls.read_text().splitlines()


def test_build_script_checks_each_plan_with_polygraphy_and_writes_its_timing_fake(exported_copy, tmp_path):
    result, calls = _run_build_script(exported_copy, tmp_path)
    assert result.returncode == 0, result.stderr
    engines = exported_copy / "engines"
    for cfg in ("w4a8", "w8a8"):
        ort = next(c for c in calls if c.startswith(f"polygraphy run onnx/unet_{cfg}.ort.onnx --onnxrt"))
        check = f"engines/.check/unet_{cfg}"
        assert "--input-shapes sample:[4,1,16,16] timestep:[4] " in ort
        assert f"--save-inputs {check}/inputs.json --save-outputs {check}/onnxrt.json" in ort
        assert (f"polygraphy run engines/unet_{cfg}.plan --model-type engine --trt --load-inputs {check}/inputs.json "
                f"--load-outputs {check}/onnxrt.json --validate --check-error-stat quantile --error-quantile 0.99 "
                f"--atol 0.05 --rtol 0.05") in calls
        assert (f"trtexec --loadEngine=engines/unet_{cfg}.plan --shapes=sample:4x1x16x16,timestep:4 "
                f"--useCudaGraph --noDataTransfers --useSpinWait") in calls
        assert f"engines/unet_{cfg}.plan matches onnx/unet_{cfg}.ort.onnx" in result.stdout
    latencies = measured_latencies(engines)
    assert {c: (r["median_ms"], r["batch"]) for c, r in latencies.items()} == {"w4a8": (0.8125, 4), "w8a8": (1.5, 4)}
    assert latencies["w4a8"]["measured_by"] == "trtexec" and latencies["w4a8"]["engine"] == "unet_w4a8.plan"
    timed = [line for line in result.stdout.splitlines() if " ms per call at batch " in line]
    assert timed == [f"engines/unet_{c}.plan ({c}): median {m} ms per call at batch 4 on {latencies[c]['gpu']} "
                     "(trtexec GPU Compute Time)" for c, m in (("w4a8", "0.8125"), ("w8a8", "1.5"))]
    # the check's scratch files are hidden from `ptqd verify`'s list of unlisted artifacts
    assert (engines / ".check" / "unet_w4a8" / "inputs.json").is_file()
    assert not any(".check" in p for p in verify(exported_copy))


def test_build_script_fails_when_a_plan_differs_but_times_them_all_fake(exported_copy, tmp_path):
    result, _ = _run_build_script(exported_copy, tmp_path, FAIL_PLAN="unet_w8a8")
    assert result.returncode == 1
    assert "engines/unet_w8a8.plan DIFFERS from onnx/unet_w8a8.ort.onnx" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "failed: unet_w8a8"
    assert sorted(measured_latencies(exported_copy / "engines")) == ["w4a8", "w8a8"]


def test_build_script_without_polygraphy_stops_before_building_unless_told_to_skip_fake(exported_copy, tmp_path):
    result, calls = _run_build_script(exported_copy, tmp_path, polygraphy=False)
    assert result.returncode == 1 and "pip install polygraphy onnxruntime" in result.stderr
    assert calls == [] and not list((exported_copy / "engines").glob("*.plan"))
    result, calls = _run_build_script(exported_copy, tmp_path, polygraphy=False, PTQD_SKIP_CHECK="1")
    assert result.returncode == 0, result.stderr
    assert "engines/unet_w4a8.plan: not checked (PTQD_SKIP_CHECK=1)" in result.stdout
    assert sorted(measured_latencies(exported_copy / "engines")) == ["w4a8", "w8a8"]


def test_integer_inputs_draw_valid_indices_of_their_embedding_table(tmp_path):
    from onnx import TensorProto, helper, numpy_helper, save

    table = numpy_helper.from_array(np.zeros((7, 3), np.float32), "table")
    nodes = [helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
             helper.make_node("Gather", ["table", "ids32"], ["emb"]),
             helper.make_node("Identity", ["timestep"], ["t"]), helper.make_node("Identity", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 5]),
                                           helper.make_tensor_value_info("other", TensorProto.INT64, ["n"]),
                                           helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["n"]),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)], [table])
    save(helper.make_model(graph), tmp_path / "g.onnx")
    assert value_ranges(tmp_path / "g.onnx") == {"ids": (0, 6), "other": (0, 0), "timestep": (0, 999), "x": (-2.0, 2.0)}
