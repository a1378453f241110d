"""`ptqd deploy OUT --kubernetes`: the Kustomize base validates strictly against the Kubernetes
schemas (kubernetes-validate, pinned) and builds with `kubectl kustomize`; the Deployment carries
what a GPU cluster needs; the container's arguments start the real (CPU) Triton server on the
repository; the autoscaler's metric is made from counters the server really exports.

TensorRT plans cannot be built here: the GPU repository is written from stand-in plan files
with a build record (the `_fake_plans` tests), which is all the manifests read of them."""
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from ptqd.deploy.client import request_images
from ptqd.deploy.kubernetes import HPA_METRIC, HPA_PENDING_METRIC, gpu_product_label
from ptqd.deploy.server import LocalTritonServer, free_port
from ptqd.engines.release import TRITON_IMAGE, TRITON_RUNTIME_IMAGE
from ptqd.runtime.conditioning import PipelineSpec
from ptqd.runtime.layout import deployment as deployed_graphs
from ptqd.runtime.schedule import FoldedSchedule
from tests.conftest import assert_user_error, run_cli

KUBERNETES_VERSION = "1.37.0"   # the schemas kubernetes-validate bundles (pinned in pyproject's dev extra)
H100 = "NVIDIA H100 80GB HBM3"


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _validate(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _schema_validate(value, definition: str) -> None:
    """One embedded object against a Kubernetes type's strict schema (for KServe's resource,
    whose pod and container parts are Kubernetes' own types)."""
    import jsonschema
    import kubernetes_validate.utils as kv
    from referencing import Registry, Resource

    folder = f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict"
    definitions = kv.schema_contents(f"{folder}/_definitions.json", KUBERNETES_VERSION)
    schema = kv.schema_contents(f"{folder}/{definition}.json", KUBERNETES_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    jsonschema.validators.Draft202012Validator(schema, registry=registry).validate(value)


def _deploy(out: Path, *extra: str) -> Path:
    result = run_cli("deploy", str(out), "--kubernetes", "--force", *extra)
    assert result.returncode == 0, result.stderr
    return out / "kubernetes"


@pytest.fixture(scope="module")
def cpu_base(exported, tmp_path_factory):
    """The session export's repository (graphs in-process, no plans) with its Kubernetes base."""
    out = tmp_path_factory.mktemp("k8s") / "out"
    shutil.copytree(exported, out)
    return _deploy(out)


def _fake_plans(out: Path, gpu: str) -> None:
    """Stand-in plans with the build record build_engines.sh writes beside each."""
    schedule = FoldedSchedule.load(out / "scheduler")
    for graph in deployed_graphs(PipelineSpec.load(out / "scheduler"), schedule.sample_shape, schedule.configs):
        (out / "engines" / graph.plan_name).write_bytes(b"not a plan: built on a GPU, never loaded here")
        (out / "engines" / graph.plan_name).with_suffix(".json").write_text(json.dumps(
            {"batch_profile": "1,4,8", "gpu": {"name": gpu, "compute_capability": "9.0"}}))


@pytest.fixture(scope="module")
def gpu_base_fake_plans(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("k8s-gpu") / "out"
    shutil.copytree(exported, out)
    _fake_plans(out, H100)
    return _deploy(out, "--unets", "tensorrt", "--model-store", "s3://models-bucket/ptqd", "--max-replicas", "6")


def _resources(base: Path) -> list[tuple[Path, dict]]:
    files = sorted(p for p in base.rglob("*.yaml") if p.name != "prometheus-adapter-values.yaml")
    return [(p, d) for p in files for d in _documents(p)]


@pytest.mark.parametrize("which", ["cpu_base", "gpu_base_fake_plans"])
def test_every_manifest_validates_strictly_and_kustomize_builds_the_base(which, request):
    base = request.getfixturevalue(which)
    kinds = set()
    for path, doc in _resources(base):
        kinds.add(doc["kind"])
        if doc["kind"] == "Kustomization":
            continue   # kubectl kustomize reads it below
        if doc["kind"] == "InferenceService":
            predictor = dict(doc["spec"]["predictor"])
            model = predictor.pop("model")
            # KServe's own fields (pkg/apis/serving/v1beta1: ComponentExtensionSpec, ModelSpec,
            # PredictorExtensionSpec); the rest are Kubernetes' PodSpec and Container
            for key in ("minReplicas", "maxReplicas"):
                assert isinstance(predictor.pop(key), int)
            assert all(isinstance(v, str) for v in predictor.pop("annotations").values())
            _schema_validate({**predictor, "containers": []}, "podspec-v1")
            kserve = {k: model.pop(k) for k in ("modelFormat", "runtime", "storageUri", "runtimeVersion") if k in model}
            assert kserve["modelFormat"] == {"name": "triton"} and kserve["runtime"] == "kserve-tritonserver"
            _schema_validate({"name": "kserve-container", **model}, "container-v1")
            continue
        if doc["kind"] == "ServiceMonitor":
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert [e["port"] for e in doc["spec"]["endpoints"]] == ["metrics"]
            continue
        _validate(doc)
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Kustomization",
            "InferenceService", "ServiceMonitor"} <= kinds
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests validated, the kustomization was not built")
    built = subprocess.run([kubectl, "kustomize", str(base)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    documents = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert {d["kind"] for d in documents} >= {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for doc in documents:
        _validate(doc)


def test_a_planted_fault_fails_the_strict_validation(cpu_base):
    import kubernetes_validate

    (doc,) = _documents(cpu_base / "deployment.yaml")
    doc["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["httpGet"]["paht"] = "/v2/health/ready"
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        _validate(doc)


def _pod(base: Path) -> dict:
    (doc,) = _documents(base / "deployment.yaml")
    return doc["spec"]["template"]["spec"]


def test_gpu_deployment_carries_probes_shm_gpu_image_and_repository_fake_plans(gpu_base_fake_plans):
    pod = _pod(gpu_base_fake_plans)
    (container,) = pod["containers"]
    # the plans' GPU pins the nodes; the NGC image serves a TensorRT, unconditional repository as is
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == TRITON_IMAGE
    assert "--model-repository=s3://models-bucket/ptqd" in container["args"]
    assert {e["name"] for e in container["env"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/models/ptqd_sampler/ready"   # the models are there
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    # requests in flight finish when a pod stops: Triton's exit timeout inside the grace period
    exit_timeout = next(int(a.split("=")[1]) for a in container["args"] if a.startswith("--exit-timeout-secs="))
    assert pod["terminationGracePeriodSeconds"] > exit_timeout >= 60
    (hpa,) = _documents(gpu_base_fake_plans / "hpa.yaml")
    assert hpa["spec"]["maxReplicas"] == 6
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods", "Pods"]   # serving metrics, not CPU
    assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == [HPA_METRIC, HPA_PENDING_METRIC]
    (deployment,) = _documents(gpu_base_fake_plans / "deployment.yaml")
    assert "replicas" not in deployment["spec"]   # the HPA's to set
    assert not (gpu_base_fake_plans / "pvc.yaml").exists()


def test_cpu_repository_asks_for_no_gpu_and_names_the_image_with_onnxruntime(cpu_base):
    pod = _pod(cpu_base)
    (container,) = pod["containers"]
    assert "nodeSelector" not in pod and "nvidia.com/gpu" not in container["resources"]["limits"]
    assert container["image"] == TRITON_RUNTIME_IMAGE
    assert "--model-repository=/models" in container["args"]
    claim = next(v for v in pod["volumes"] if v["name"] == "models")["persistentVolumeClaim"]["claimName"]
    (pvc,) = _documents(cpu_base / "pvc.yaml")
    assert pvc["metadata"]["name"] == claim
    assert "kubectl cp" in (cpu_base / "README.md").read_text()


def test_manifest_arguments_start_the_cpu_server_on_the_repository(cpu_base, tmp_path):
    """The container's arguments, verbatim but for the repository's path (the volume's mount
    point here) and the ports (free ones here), start the server; it answers correctly."""
    (container,) = _pod(cpu_base)["containers"]
    assert "command" not in container and container["args"][0] == "tritonserver"   # the image's entrypoint runs it
    repository = cpu_base.parent / "triton"
    ports = {"--http-port": free_port(), "--grpc-port": free_port(), "--metrics-port": free_port()}
    arguments = []
    for arg in container["args"][1:]:
        flag, _, value = arg.partition("=")
        if flag == "--model-repository":
            value = str(repository)
        elif flag in ports:
            value = str(ports[flag])
        arguments.append(f"{flag}={value}")
    server = LocalTritonServer(repository, http_port=ports["--http-port"], grpc_port=ports["--grpc-port"],
                               metrics_port=ports["--metrics-port"], arguments=arguments,
                               log_path=tmp_path / "tritonserver.log")
    with server:
        local = tmp_path / "local.npy"
        assert run_cli("sample", str(cpu_base.parent), "--backend", "onnxruntime", "--seed", "3", "--num", "2",
                       "--output", str(local)).returncode == 0
        np.testing.assert_array_equal(request_images(server.http_url, 2, seed=3), np.load(local))
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
            metrics = response.read().decode()
    # the series the prometheus-adapter rules read are there, for the model they name, and the
    # rules publish the metrics the HPA asks for
    values = yaml.safe_load((cpu_base / "prometheus-adapter-values.yaml").read_text())
    rules = values["rules"]["custom"]
    (hpa,) = _documents(cpu_base / "hpa.yaml")
    assert [r["name"]["as"] for r in rules] == [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    for rule in rules:
        names = re.findall(r"\b(nv_inference_\w+)\{", rule["metricsQuery"] + rule["seriesQuery"])
        assert names and 'model="ptqd_sampler"' in rule["metricsQuery"]
        for name in names:
            assert f'{name}{{model="ptqd_sampler",version="1"}}' in metrics, name


def test_gpu_product_label_follows_feature_discovery():
    assert gpu_product_label("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert gpu_product_label("NVIDIA TITAN X (Pascal)") == "NVIDIA-TITAN-X-Pascal"
    assert gpu_product_label("Tesla  T4") == "Tesla-T4"


def test_bad_kubernetes_options_are_one_line_errors_and_write_nothing(exported_copy):
    before = sorted(p.name for p in exported_copy.iterdir())
    assert_user_error(run_cli("deploy", str(exported_copy), "--kubernetes", "--force", "--model-store", "ftp://x"),
                      "--model-store", "s3://")
    assert_user_error(run_cli("deploy", str(exported_copy), "--kubernetes", "--force", "--gpu-product", "H100"),
                      "--gpu-product", "no TensorRT plans")
    assert_user_error(run_cli("deploy", str(exported_copy), "--force", "--max-replicas", "3"),
                      "--max-replicas", "only with --kubernetes")
    assert_user_error(run_cli("deploy", str(exported_copy), "--kubernetes", "--force", "--min-replicas", "5"),
                      "--min-replicas 5")
    assert_user_error(run_cli("deploy", str(exported_copy), "--kubernetes", "--force", "--storage-secret", "s"),
                      "--storage-secret", "s3://")
    assert_user_error(run_cli("deploy", str(exported_copy), "--kubernetes", "--force", "--model-store", "pvc:My_Claim"),
                      "not a Kubernetes name")
    assert sorted(p.name for p in exported_copy.iterdir()) == before
    # plans from two GPUs cannot be pinned to one node type
    _fake_plans(exported_copy, H100)
    record = next((exported_copy / "engines").glob("*.plan")).with_suffix(".json")
    meta = json.loads(record.read_text())
    meta["gpu"]["name"] = "NVIDIA L40S"
    record.write_text(json.dumps(meta))
    extra = exported_copy / "engines" / "vae_extra.plan"
    extra.write_bytes(b"x")
    extra.with_suffix(".json").write_text(json.dumps({"batch_profile": "1,4,8", "gpu": {"name": H100}}))
    assert_user_error(run_cli("deploy", str(exported_copy), "--kubernetes", "--force", "--unets", "tensorrt"),
                      "different GPUs")
    assert not (exported_copy / "kubernetes").exists()
