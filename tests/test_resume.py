"""Resumable export-trt: a rerun reuses the stages whose inputs are unchanged, says so, and
redoes the ones that changed (and everything after them)."""
import json

from tests.conftest import EXPORT_ARGS as ARGS
from tests.conftest import assert_user_error, run_cli


def _export(out, *extra):
    return run_cli(*ARGS, "--output", str(out), *extra, entry="export-trt")


def _snapshot(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_rerun_with_the_same_inputs_does_nothing(exported_copy):
    before = _snapshot(exported_copy)
    result = _export(exported_copy)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout
    assert _snapshot(exported_copy) == before


def test_changed_engine_options_redo_engines_and_reuse_calibration(exported_copy):
    before = _snapshot(exported_copy)
    refused = _export(exported_copy, "--batch", "1,2,4")
    assert_user_error(refused, "redo: engines, deploy, report", "--force")
    assert _snapshot(exported_copy) == before

    result = _export(exported_copy, "--batch", "1,2,4", "--force")
    assert result.returncode == 0, result.stderr
    assert "[calibrate] inputs unchanged: reused" in result.stdout
    assert "[export] inputs unchanged: reused" in result.stdout
    assert "[engines] onnxruntime:" in result.stdout  # rebuilt, not reused
    after = _snapshot(exported_copy)
    for rel, data in before.items():
        if rel.startswith(("calibration/", "onnx/", "scheduler/")):
            assert after[rel] == data, rel
    assert json.loads(after["engines/onnxruntime.json"])["batch_profile"] == "1,2,4"
    assert run_cli("verify", str(exported_copy)).returncode == 0


def test_a_stage_output_changed_since_is_redone(exported_copy):
    """Same options, but onnx/precision_plan.json (an export output) was edited: its recorded
    output digest no longer matches, so the export stage is not trusted and is redone; its
    graphs come out byte-identical, so the stages after it are reused, calibration before it
    too. (Every stage's output is checked the same way: resume.Resume.)"""
    path = exported_copy / "onnx" / "precision_plan.json"
    path.write_text(path.read_text() + " ")
    assert_user_error(_export(exported_copy), "redo: export", "--force")
    result = _export(exported_copy, "--force")
    assert result.returncode == 0, result.stderr
    assert "[calibrate] inputs unchanged" in result.stdout
    assert "[export] inputs unchanged" not in result.stdout
    assert "[engines] inputs unchanged" in result.stdout
    assert not path.read_text().endswith(" ")
    assert run_cli("verify", str(exported_copy)).returncode == 0


def test_no_report_drops_the_report_and_reuses_the_rest(exported_copy):
    assert_user_error(_export(exported_copy, "--no-report"), "remove report", "--force")
    result = _export(exported_copy, "--no-report", "--force")
    assert result.returncode == 0, result.stderr
    assert "[deploy] inputs unchanged: reused" in result.stdout
    assert not (exported_copy / "report").exists()
    assert "report:" not in result.stdout
    assert run_cli("verify", str(exported_copy)).returncode == 0


def test_a_corrupt_manifest_is_one_line_and_leaves_the_output(exported_copy):
    (exported_copy / "manifest.json").write_text("[1, 2]")
    before = _snapshot(exported_copy)
    assert_user_error(_export(exported_copy), "exists and is not empty", "--force")
    assert _snapshot(exported_copy) == before
    result = run_cli("verify", str(exported_copy))
    assert result.returncode == 1 and "manifest.json: not a JSON object" in result.stdout


def test_a_calibration_with_another_weight_rounding_is_refused(exported_copy):
    """The 4-bit default is GPTQ: asking for it again is the same calibration, asking for
    nearest rounding would redo it, which needs --force."""
    before = _snapshot(exported_copy)
    assert_user_error(_export(exported_copy, "--weight-rounding", "nearest"), "redo: calibrate", "--force")
    assert _snapshot(exported_copy) == before
    same = _export(exported_copy, "--weight-rounding", "gptq")
    assert same.returncode == 0, same.stderr
    assert "up to date" in same.stdout
