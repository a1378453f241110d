"""OUT/kubernetes: a Kustomize base that serves OUT/triton with Triton on a Kubernetes cluster
(`kubectl apply -k OUT/kubernetes`), written by `ptqd deploy OUT --kubernetes`.

    kubernetes/
      kustomization.yaml        the base: the resources below
      deployment.yaml           tritonserver with `ptqd serve`'s arguments (server.server_arguments)
      service.yaml              http 8000, grpc 8001, metrics 8002
      pdb.yaml                  PodDisruptionBudget
      hpa.yaml                  autoscaling/v2 on the sampler's queue time over its compute time
      pvc.yaml                  the claim the repository is copied into (repository on a volume)
      prometheus-adapter-values.yaml   the rule that turns Triton's counters into the HPA's metric
      optional/                 not in the base: ServiceMonitor, a pod to copy the repository into
                                the claim, a KServe InferenceService
      README.md                 what to set, how to apply, how the autoscaler's metric flows

Everything is derived from the repository as written (its config.pbtxt files, sizes, pipeline
spec) and from the engines' build records (which GPU built the plans): nothing to fill in except
where the repository lives and, for a text or CPU repository, which registry holds the image.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import click
import yaml

from ptqd.deploy import model_config
from ptqd.deploy.repository import SAMPLER
from ptqd.deploy.server import GRPC_PORT, HTTP_PORT, METRICS_PORT, server_arguments
from ptqd.engines.release import NGC_RELEASE, TRITON_IMAGE, TRITON_RUNTIME_IMAGE
from ptqd.errors import UserError
from ptqd.runtime.conditioning import PipelineSpec

NAME = "ptqd"
MODELS_MOUNT = "/models"            # where the container sees a repository on a volume
# The NGC Triton image runs as root by default but ships this unprivileged user
# (triton-server, uid/gid 1000); the pod runs as it.
TRITON_UID = 1000
STORAGE_SCHEMES = ("s3://", "gs://")
# The HPA's metrics, per pod, from the sampler's Triton metrics (prometheus-adapter rules
# below); only the sampler's count: a request waits for a sampler instance, and the denoiser
# models' queue time is mostly the dynamic batcher's deliberate delay.
# - the sampler's queue time over its compute time (NVIDIA's autoscaling tutorial, target 1:
#   requests wait as long as they compute). Triton adds to both counters when a request ends,
#   so a window in which no request ends (requests longer than it) reads nothing;
# - the requests waiting for a sampler instance now (a gauge, target 1), which shows long
#   requests piling up.
# The HPA follows whichever asks for more pods. Neither sees a pod whose sampler instances
# outnumber what it can run at once (they slow each other down instead of queueing): keep
# --instances at what the pod runs concurrently.
HPA_METRIC = "ptqd_sampler_queue_compute_ratio"
HPA_PENDING_METRIC = "ptqd_sampler_pending_requests"
HPA_TARGET = "1"
RATE_WINDOW = "2m"    # two samples of Prometheus' default 1-minute scrape
# A stopping pod stops getting new requests (PRESTOP_S, while the endpoints update), then lets
# requests in flight finish (Triton's exit timeout), within the grace period.
KUBERNETES_EXIT_S = 120
PRESTOP_S = 10

# Sizing assumptions (estimates, stated in the README): a pod reads and loads the repository at
# 25 MB/s at worst (a network volume or object storage), after 60 s of container start.
LOAD_BYTES_PER_S = 25e6
START_S = 60
PROBE_PERIOD_S = 10
MIN_STARTUP_FAILURES = 30           # NVIDIA's chart: 30 x 10 s
SHM_BASE = 256 << 20                # room for the Python backend's own regions (1 MiB per stub) to grow
# bytes per element; a string (a prompt) taken as 256
TYPE_BYTES = {"TYPE_FP32": 4, "TYPE_FP16": 2, "TYPE_INT64": 8, "TYPE_INT32": 4, "TYPE_STRING": 256}


@dataclass
class ServedModel:
    """One model of the repository, as its config.pbtxt says."""
    name: str
    config: object            # model_config_pb2.ModelConfig
    folder: Path

    @property
    def on_gpu(self) -> bool:
        return self.config.platform == "tensorrt_plan"

    @property
    def python(self) -> bool:
        return self.config.backend == "python"

    @property
    def instances(self) -> int:
        return sum(g.count or 1 for g in self.config.instance_group) or 1

    def parameter(self, key: str) -> str | None:
        value = self.config.parameters.get(key)
        return value.string_value if value is not None else None

    def io_bytes(self, first_dim: int | None = None) -> int:
        """Inputs plus outputs at the largest request: a batched model's max batch, else
        `first_dim` for a variable leading dimension (the sampler's images)."""
        batch = max(self.config.max_batch_size, 1)
        total = 0
        for tensor in list(self.config.input) + list(self.config.output):
            dims = [(first_dim or 1) if d == -1 else d for d in tensor.dims]
            per = math.prod(dims) * TYPE_BYTES.get(model_config.type_name(tensor.data_type), 8)
            total += batch * per
        return total


NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")             # a Kubernetes object's name
LABEL_VALUE_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")   # a label's value


def _object_name(option: str, name: str) -> str:
    if not NAME_RE.fullmatch(name) or len(name) > 253:
        raise UserError(f"{option} {name!r}: not a Kubernetes name (lower-case letters, digits, '-' and '.')")
    return name


@dataclass
class Storage:
    """Where the pods find the repository: a claim mounted at /models, or an object store URL
    Triton reads itself with the credentials in `secret`."""
    url: str | None = None
    claim: str = f"{NAME}-models"
    secret: str = f"{NAME}-storage"

    @classmethod
    def parse(cls, text: str, secret: str | None) -> "Storage":
        if text.startswith(STORAGE_SCHEMES) and len(text.split("://", 1)[1].strip("/")) > 0:
            return cls(url=text.rstrip("/"), secret=_object_name("--storage-secret", secret or cls.secret))
        if secret is not None:
            raise UserError("--storage-secret: only with an s3:// or gs:// --model-store (a claim needs no credentials)")
        if text == "pvc":
            return cls()
        if text.startswith("pvc:"):
            return cls(claim=_object_name("--model-store pvc:CLAIM", text[4:]))
        raise UserError(f"--model-store {text!r}: expected pvc, pvc:CLAIM, s3://BUCKET/PATH or gs://BUCKET/PATH")

    @property
    def repository(self) -> str:
        return self.url or MODELS_MOUNT

    @property
    def uri(self) -> str:
        """The same place as a KServe storageUri."""
        return self.url or f"pvc://{self.claim}"


@dataclass
class Plan:
    """What the manifests say, all decided before anything is written."""
    out: Path
    storage: Storage
    min_replicas: int
    max_replicas: int
    models: list[ServedModel]
    repository_bytes: int
    image: str
    image_why: str
    gpu_product: str | None
    gpu_why: str

    @property
    def gpu(self) -> bool:
        return any(m.on_gpu for m in self.models)

    @property
    def creates_claim(self) -> bool:
        """pvc.yaml is written: the repository's claim is the base's own (not pvc:CLAIM)."""
        return self.storage.url is None and self.storage.claim == Storage.claim

    @property
    def sampler(self) -> ServedModel:
        return next(m for m in self.models if m.name == SAMPLER)

    def shm_bytes(self) -> int:
        """/dev/shm for the Python backend: every Python model's instances hold a request's
        inputs and outputs there at once, the sampler with its largest BLS call beside its
        images; twice that for growth, with the backend's own regions."""
        graphs = [m for m in self.models if m.name != SAMPLER]
        largest_call = max((m.io_bytes() for m in graphs), default=0)
        max_images = int(self.sampler.parameter("max_images") or 1)
        total = self.sampler.instances * (self.sampler.io_bytes(max_images) + largest_call)
        total += sum(m.instances * m.io_bytes() for m in graphs if m.python)
        return SHM_BASE + 2 * total

    def memory_bytes(self) -> int:
        """Host memory: every Python model instance may hold the graphs it runs, the sampler
        its images; plus the memory-backed /dev/shm, which counts against the pod."""
        instances = max(m.instances for m in self.models)
        return (instances + 1) * self.repository_bytes + self.shm_bytes() + (1 << 30)

    def startup_failures(self) -> int:
        seconds = START_S + self.repository_bytes / LOAD_BYTES_PER_S
        return max(MIN_STARTUP_FAILURES, math.ceil(seconds / PROBE_PERIOD_S))


def _mebibytes(n: int) -> str:
    return f"{math.ceil(n / (1 << 20))}Mi"


def _gibibytes(n: int) -> str:
    return f"{max(1, math.ceil(n / (1 << 30)))}Gi"


def read_models(repository: Path) -> list[ServedModel]:
    models = []
    for config_path in sorted(repository.glob(f"*/{model_config.CONFIG_FILE}")):
        models.append(ServedModel(config_path.parent.name, model_config.parse_config(config_path.read_text()),
                                  config_path.parent))
    if not any(m.name == SAMPLER for m in models):
        raise UserError(f"{repository} has no {SAMPLER} model: write it with `ptqd deploy` first")
    return models


def gpu_product_label(name: str) -> str:
    """The value NVIDIA's GPU Feature Discovery gives a node's nvidia.com/gpu.product label for
    a GPU named `name` (NVML's name, as nvidia-smi prints it): characters other than letters,
    digits, "-", "_", "." and spaces dropped, each run of spaces one "-" (k8s-device-plugin,
    internal/lm/resource.go sanitise). A MIG or shared GPU's label has a suffix: --gpu-product."""
    kept = re.sub(r"[^A-Za-z0-9\-_. ]", "", name)
    return "-".join(kept.split())


def recorded_gpus(engines: Path) -> set[str]:
    """The GPUs that built OUT's plans, from each plan's build record (engines/<plan>.json)."""
    names = set()
    for plan in sorted(engines.glob("*.plan")):
        record = plan.with_suffix(".json")
        try:
            gpu = json.loads(record.read_text()).get("gpu") or {}
        except (OSError, ValueError):
            continue
        name = gpu.get("name") if isinstance(gpu, dict) else gpu
        if name and name != "unknown":
            names.add(name)
    return names


def _gpu_product(plan_gpu: bool, engines: Path, override: str | None) -> tuple[str | None, str]:
    if not plan_gpu:
        if override:
            raise UserError("--gpu-product: this repository runs no TensorRT plans (its graphs run on the CPU); "
                            "deploy with --unets tensorrt after building the engines on a GPU")
        return None, "the repository has no TensorRT plans (its graphs run on the CPU)"
    names = recorded_gpus(engines)
    if override:
        label = _label_value("--gpu-product", override.strip())
        recorded = ", ".join(sorted(names)) or "not recorded"
        return label, f"--gpu-product (the plans were built on: {recorded})"
    if len(names) > 1:
        raise UserError(f"the plans in {engines} were built on different GPUs ({', '.join(sorted(names))}): "
                        "rebuild them on one, or name the nodes' GPU with --gpu-product")
    if not names:
        raise UserError(f"the plans in {engines} do not record the GPU that built them: name it with "
                        "--gpu-product (the nodes' nvidia.com/gpu.product label, e.g. NVIDIA-H100-80GB-HBM3)")
    name = names.pop()
    return (_label_value(f"the label of the plans' GPU ({name})", gpu_product_label(name)),
            f"the plans were built on {name}")


def _packages(models: list[ServedModel], repository: Path) -> list[str]:
    """The Python packages beyond the NGC image's numpy that the repository's models import."""
    packages = []
    if any(m.python and any(m.folder.glob("1/**/*.onnx")) for m in models):
        packages.append("onnxruntime")
    if PipelineSpec.load(repository / SAMPLER / "1").kind == "text":
        packages.append("tokenizers")
    return packages


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_options(model_store: str = "pvc", storage_secret: str | None = None, gpu_product: str | None = None,
                  min_replicas: int = 1, max_replicas: int = 4) -> Storage:
    """The options alone, before anything is built: one-line errors for what is wrong."""
    if not 1 <= min_replicas <= max_replicas:
        raise UserError(f"--min-replicas {min_replicas} / --max-replicas {max_replicas}: "
                        "need 1 <= min <= max")
    if gpu_product is not None:
        _label_value("--gpu-product", gpu_product.strip())
    return Storage.parse(model_store, storage_secret)


def _label_value(what: str, value: str) -> str:
    if not LABEL_VALUE_RE.fullmatch(value) or len(value) > 63:
        raise UserError(f"{what} {value!r}: not a label value; name the nodes' nvidia.com/gpu.product "
                        "with --gpu-product, e.g. NVIDIA-H100-80GB-HBM3")
    return value


def plan_manifests(out: Path, repository: Path, model_store: str = "pvc", storage_secret: str | None = None,
                   gpu_product: str | None = None, min_replicas: int = 1, max_replicas: int = 4) -> Plan:
    storage = check_options(model_store, storage_secret, gpu_product, min_replicas, max_replicas)
    models = read_models(repository)
    plan_gpu = any(m.on_gpu for m in models)
    product, gpu_why = _gpu_product(plan_gpu, out / "engines", gpu_product)
    packages = _packages(models, repository)
    if packages:
        image, why = TRITON_RUNTIME_IMAGE, (f"{TRITON_IMAGE} with {' and '.join(packages)}, which the repository's "
                                            "Python models import; build it and push it to your registry")
    else:
        image, why = TRITON_IMAGE, "the repository needs nothing beyond NVIDIA's image"
    return Plan(out, storage, min_replicas, max_replicas, models, _folder_bytes(repository), image, why,
                product, gpu_why)


LABELS = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/component": "triton"}


def _container(plan: Plan) -> dict:
    storage = plan.storage
    env, mounts = [], [{"name": "dshm", "mountPath": "/dev/shm"}]
    if storage.url is None:
        mounts.append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
    elif storage.url.startswith("s3://"):
        env = [{"name": key, "valueFrom": {"secretKeyRef": {"name": storage.secret, "key": key,
                                                             **({"optional": True} if optional else {})}}}
               for key, optional in (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False),
                                     ("AWS_DEFAULT_REGION", True), ("AWS_SESSION_TOKEN", True))]
    else:
        env = [{"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/secrets/google/credentials.json"}]
        mounts.append({"name": "gcs-credentials", "mountPath": "/var/secrets/google", "readOnly": True})
    if storage.url is not None:
        mounts.append({"name": "tmp", "mountPath": "/tmp"})   # Triton copies the repository here

    def probe(path: str, failures: int, period: int = PROBE_PERIOD_S) -> dict:
        return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 5,
                "failureThreshold": failures}

    resources = {"requests": {"cpu": "2", "memory": _mebibytes(plan.memory_bytes())},
                 "limits": {"memory": _mebibytes(plan.memory_bytes())}}
    if plan.gpu:
        resources["limits"]["nvidia.com/gpu"] = 1
    container = {
        "name": "tritonserver",
        "image": plan.image,
        "imagePullPolicy": "IfNotPresent",
        # args, not command: the image's entrypoint (NGC's driver and compatibility checks) runs first
        "args": ["tritonserver", *server_arguments(storage.repository, exit_timeout_s=KUBERNETES_EXIT_S)],
        "ports": [{"name": "http", "containerPort": HTTP_PORT}, {"name": "grpc", "containerPort": GRPC_PORT},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        # loading the engines takes the startup probe's budget; only then do liveness and
        # readiness start, so a slow load is not killed as a hung server. It asks for the
        # sampler itself: a server started before the repository was copied in has no models
        # and is "ready"; it is restarted until they are there
        "startupProbe": probe(f"/v2/models/{SAMPLER}/ready", plan.startup_failures()),
        "readinessProbe": probe("/v2/health/ready", 3, 5),
        "livenessProbe": probe("/v2/health/live", 3),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_S)]}}},
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }
    if env:
        container["env"] = env
    return container


def _volumes(plan: Plan) -> list[dict]:
    storage = plan.storage
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _mebibytes(plan.shm_bytes())}}]
    if storage.url is None:
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": storage.claim, "readOnly": True}})
    else:
        volumes.append({"name": "tmp", "emptyDir": {"sizeLimit": _gibibytes(2 * plan.repository_bytes)}})
        if storage.url.startswith("gs://"):
            volumes.append({"name": "gcs-credentials", "secret": {"secretName": storage.secret}})
    return volumes


def pod_spec(plan: Plan) -> dict:
    spec = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": TRITON_UID, "runAsGroup": TRITON_UID,
                            "fsGroup": TRITON_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        # requests in flight (each a whole sampling run) finish before the server exits
        "terminationGracePeriodSeconds": PRESTOP_S + KUBERNETES_EXIT_S + 20,
        "containers": [_container(plan)],
        "volumes": _volumes(plan),
    }
    if plan.gpu_product:
        # engines run only on the GPU (and TensorRT) that built them
        spec["nodeSelector"] = {"nvidia.com/gpu.product": plan.gpu_product}
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return spec


def deployment(plan: Plan) -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": NAME, "labels": dict(LABELS)},
        # no replicas: the HPA owns the count (one here would reset it on every apply)
        "spec": {
            "selector": {"matchLabels": dict(LABELS)},
            "template": {
                "metadata": {"labels": dict(LABELS),
                             # for a Prometheus that scrapes annotated pods (no ServiceMonitor)
                             "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                                             "prometheus.io/path": "/metrics"}},
                "spec": pod_spec(plan),
            },
        },
    }


def service() -> dict:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": NAME, "labels": dict(LABELS)},
        "spec": {"selector": dict(LABELS), "ports": [
            {"name": "http", "port": HTTP_PORT, "targetPort": "http"},
            {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "appProtocol": "grpc"},
            {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}]},
    }


def disruption_budget() -> dict:
    # one pod at a time: a drain never takes every replica, and a single replica can still move
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": NAME, "labels": dict(LABELS)},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(LABELS)}}}


def autoscaler(plan: Plan) -> dict:
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": NAME, "labels": dict(LABELS)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME},
            "minReplicas": plan.min_replicas, "maxReplicas": plan.max_replicas,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": name},
                                                  "target": {"type": "AverageValue", "averageValue": HPA_TARGET}}}
                        for name in (HPA_METRIC, HPA_PENDING_METRIC)],
            # a new GPU pod takes minutes to load its engines: add one at a time, remove slowly
            "behavior": {"scaleUp": {"stabilizationWindowSeconds": 60,
                                     "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]},
                         "scaleDown": {"stabilizationWindowSeconds": 600,
                                       "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}]}},
        },
    }


def claim(plan: Plan) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": plan.storage.claim, "labels": dict(LABELS)},
            # every replica mounts it (read-only); copying the repository in needs write access
            "spec": {"accessModes": ["ReadWriteMany"],
                     "resources": {"requests": {"storage": _gibibytes(plan.repository_bytes * 5 // 4)}}}}


def adapter_rules() -> list[dict]:
    """The prometheus-adapter rules (its Helm chart's `rules.custom`) that make the HPA's
    metrics per pod: HPA_METRIC from Triton's cumulative counters (the rates' ratio over
    RATE_WINDOW), HPA_PENDING_METRIC from its gauge."""
    sampler = f'model="{SAMPLER}"'
    series = lambda name: f'{name}{{namespace!="",pod!="",{sampler}}}'
    summed = lambda expr: f"sum by (<<.GroupBy>>) ({expr})"
    rate = lambda counter: summed(f"rate({counter}{{<<.LabelMatchers>>,{sampler}}}[{RATE_WINDOW}])")
    pods = {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}}
    return [
        {"seriesQuery": series("nv_inference_queue_duration_us"), "resources": pods,
         "name": {"matches": "^nv_inference_queue_duration_us$", "as": HPA_METRIC},
         "metricsQuery": f"{rate('nv_inference_queue_duration_us')} / clamp_min("
                         f"{rate('nv_inference_compute_infer_duration_us')}, 1)"},
        {"seriesQuery": series("nv_inference_pending_request_count"), "resources": pods,
         "name": {"matches": "^nv_inference_pending_request_count$", "as": HPA_PENDING_METRIC},
         "metricsQuery": summed(f"nv_inference_pending_request_count{{<<.LabelMatchers>>,{sampler}}}")},
    ]


def service_monitor() -> dict:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": NAME, "labels": dict(LABELS)},
            "spec": {"selector": {"matchLabels": dict(LABELS)},
                     "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}]}}


def model_loader(plan: Plan) -> dict:
    """A pod that mounts the claim writable, for `kubectl cp` (it needs tar in the container).
    It runs as root: a ReadWriteMany volume's root directory is often root's, and not every
    driver applies fsGroup; what it writes is readable by all, the server's user included."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{NAME}-model-loader", "labels": {"app.kubernetes.io/name": f"{NAME}-model-loader"}},
            "spec": {"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                     "restartPolicy": "Never",
                     "containers": [{"name": "loader", "image": "busybox:1.37", "command": ["sleep", "3600"],
                                     "securityContext": {"allowPrivilegeEscalation": False},
                                     "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT}]}],
                     "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": plan.storage.claim}}]}}


# KServe's Triton runtime (config/runtimes/kserve-tritonserver.yaml) starts tritonserver with
# the repository at /mnt/models and its own ports; an InferenceService's args are appended to
# the runtime's, so only ptqd's other arguments go there.
KSERVE_RUNTIME = "kserve-tritonserver"
KSERVE_RUNTIME_FLAGS = ("--model-repository=", "--http-port=", "--grpc-port=")


def inference_service(plan: Plan) -> dict:
    """The same pods as a KServe InferenceService (raw deployment, no Knative), its autoscaling
    left to kserve-hpa.yaml (KServe's own HPA knows only CPU and memory)."""
    pod = pod_spec(plan)
    container = pod["containers"][0]
    model = {"modelFormat": {"name": "triton"}, "runtime": KSERVE_RUNTIME, "storageUri": plan.storage.uri,
             "args": [a for a in container["args"][1:] if not a.startswith(KSERVE_RUNTIME_FLAGS)],
             "resources": container["resources"],
             "volumeMounts": [m for m in container["volumeMounts"] if m["name"] == "dshm"]}
    if plan.image == TRITON_IMAGE:
        model["runtimeVersion"] = TRITON_IMAGE.rsplit(":", 1)[1]   # replaces the runtime image's tag
    else:
        model["image"] = plan.image
    predictor = {"minReplicas": plan.min_replicas, "maxReplicas": plan.max_replicas,
                 # passed on to the pods: Prometheus scrapes Triton's metrics port for the HPA
                 "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                                 "prometheus.io/path": "/metrics"},
                 "securityContext": pod["securityContext"],
                 "volumes": [v for v in pod["volumes"] if v["name"] == "dshm"], "model": model}
    for key in ("nodeSelector", "tolerations"):
        if key in pod:
            predictor[key] = pod[key]
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": NAME, "labels": dict(LABELS),
                         "annotations": {"serving.kserve.io/deploymentMode": "RawDeployment",
                                         "serving.kserve.io/autoscalerClass": "external"}},
            "spec": {"predictor": predictor}}


def kserve_autoscaler(plan: Plan) -> dict:
    hpa = autoscaler(plan)
    hpa["spec"]["scaleTargetRef"]["name"] = f"{NAME}-predictor"   # the Deployment KServe makes
    return hpa


def _dump(docs: list[dict], header: str) -> str:
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.strip().splitlines())
    return comment + "---\n".join(yaml.safe_dump(d, sort_keys=False, default_flow_style=False) for d in docs)


def manifest_files(plan: Plan) -> dict[str, str]:
    """File name under OUT/kubernetes -> text."""
    gpu = (f"Pods run only on nodes labelled nvidia.com/gpu.product={plan.gpu_product} ({plan.gpu_why}):\n"
           "a TensorRT plan loads only on the GPU model and TensorRT release that built it."
           if plan.gpu_product else f"No GPU: {plan.gpu_why}.")
    files = {
        "deployment.yaml": _dump([deployment(plan)], f"""
Triton {NGC_RELEASE} serving the ptqd repository; written by `ptqd deploy --kubernetes`.
Image {plan.image}: {plan.image_why}.
{gpu}
Arguments: the same as `ptqd serve` (ptqd/deploy/server.py server_arguments).
/dev/shm: memory-backed, {_mebibytes(plan.shm_bytes())} for the Python backend's tensors (Kubernetes gives 64 MB)."""),
        "service.yaml": _dump([service()], "HTTP 8000, gRPC 8001, Prometheus metrics 8002."),
        "pdb.yaml": _dump([disruption_budget()], "Voluntary disruptions (drains) take one pod at a time."),
        "hpa.yaml": _dump([autoscaler(plan)], f"""
Scales on {HPA_METRIC} (the sampler's queue time over its compute time) and
{HPA_PENDING_METRIC} (requests waiting for a sampler instance), per pod, made from
Triton's metrics by the prometheus-adapter rules in prometheus-adapter-values.yaml."""),
    }
    resources = ["deployment.yaml", "service.yaml", "pdb.yaml", "hpa.yaml"]
    if plan.creates_claim:
        files["pvc.yaml"] = _dump([claim(plan)], "The model repository's volume: copy OUT/triton into it (README.md).")
        resources.append("pvc.yaml")
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": resources}
    if plan.image == TRITON_RUNTIME_IMAGE:
        name, tag = plan.image.split(":")
        kustomization["images"] = [{"name": name, "newName": name, "newTag": tag}]
    files["kustomization.yaml"] = _dump([kustomization], """
A base: use it from an overlay (README.md says what to set first).""" + ("""
The image is built, not pulled from NGC: the overlay's `kustomize edit set image
ptqd-triton=REGISTRY/ptqd-triton:TAG` points the pods at the copy you pushed.""" if plan.image == TRITON_RUNTIME_IMAGE else ""))
    files["prometheus-adapter-values.yaml"] = _dump([{"rules": {"custom": adapter_rules()}}], f"""
Helm values for prometheus-community/prometheus-adapter (not a Kubernetes resource):
helm upgrade --install prometheus-adapter prometheus-community/prometheus-adapter \\
  -f prometheus-adapter-values.yaml --set prometheus.url=http://PROMETHEUS-SERVICE.NAMESPACE.svc
It publishes {HPA_METRIC} and {HPA_PENDING_METRIC} per pod on custom.metrics.k8s.io,
which hpa.yaml reads.""")
    files["optional/servicemonitor.yaml"] = _dump([service_monitor()], """
For a Prometheus run by prometheus-operator: scrape the pods' metrics port every 15 s
(the adapter's rate needs at least two samples in its window). Not in the base: apply it where
the ServiceMonitor kind exists.""")
    files["optional/kserve.yaml"] = _dump([inference_service(plan), kserve_autoscaler(plan)], f"""
The same server through KServe (instead of the base, not beside it): an InferenceService on
the {KSERVE_RUNTIME} runtime, model from {plan.storage.uri}, and the base's HPA for the
Deployment KServe makes (KServe's own autoscaler scales on CPU or memory only).""")
    if plan.storage.url is None:
        files["optional/model-loader.yaml"] = _dump([model_loader(plan)], f"""
A pod to copy the repository into the claim {plan.storage.claim} (README.md); delete it afterwards.""")
    return files


def readme(plan: Plan) -> str:
    storage = plan.storage
    if storage.url is None:
        claim = ("`pvc.yaml` creates it: ReadWriteMany, so every replica can mount it; give it a storage\n"
                 "class that offers that (NFS, CephFS, EFS, Filestore: `storageClassName` in a patch)"
                 if plan.creates_claim else "It must exist already, readable by every replica")
        load = f"""The repository lives on the claim `{storage.claim}`, mounted read-only at
{MODELS_MOUNT}. {claim}. Copy the repository in once:

    kubectl apply -f optional/model-loader.yaml
    kubectl wait --for=condition=Ready pod/{NAME}-model-loader
    kubectl cp {plan.out}/triton/. {NAME}-model-loader:{MODELS_MOUNT}/
    kubectl delete -f optional/model-loader.yaml

A pod that started before the copy has no models: its startup probe (the sampler model's
readiness) restarts it until they are there."""
    elif storage.url.startswith("s3://"):
        load = f"""Triton reads the repository from `{storage.url}` itself (copy `{plan.out}/triton/*` there), with
the credentials in the secret `{storage.secret}`:

    kubectl create secret generic {storage.secret} --from-literal=AWS_ACCESS_KEY_ID=... \\
        --from-literal=AWS_SECRET_ACCESS_KEY=... --from-literal=AWS_DEFAULT_REGION=..."""
    else:
        load = f"""Triton reads the repository from `{storage.url}` itself (copy `{plan.out}/triton/*` there), with
the service-account key in the secret `{storage.secret}`:

    kubectl create secret generic {storage.secret} --from-file=credentials.json=KEY.json"""
    image = (f"""The pods run `{plan.image}`: {plan.image_why}:
  `docker/gpu_pipeline.sh triton-image`, `docker tag {plan.image} REGISTRY/{plan.image}`,
  `docker push REGISTRY/{plan.image}`; the overlay above points the base at it."""
             if plan.image == TRITON_RUNTIME_IMAGE else f"The pods run NVIDIA's `{plan.image}` ({plan.image_why}).")
    gpu = (f"""Each pod asks for one `nvidia.com/gpu` and runs only on nodes labelled
  `nvidia.com/gpu.product={plan.gpu_product}` ({plan.gpu_why}; NVIDIA's GPU Feature Discovery sets
  the label): a TensorRT plan loads only on the GPU model and TensorRT release that built it. For
  other GPUs, build the engines there and deploy again (`--gpu-product` names the label value
  when the build record cannot, e.g. for a MIG slice)."""
           if plan.gpu_product else f"The pods ask for no GPU: {plan.gpu_why}.")
    overlay_image = (f"\n    kustomize edit set image {plan.image.split(':')[0]}=REGISTRY/{plan.image}"
                     if plan.image == TRITON_RUNTIME_IMAGE else "")
    return f"""# Serving this repository on Kubernetes

Written by `ptqd deploy --kubernetes` for `{plan.out}/triton`: a Kustomize base. Leave it as
written (`ptqd verify` checks it, `ptqd deploy --kubernetes --force` rewrites it) and put your
changes in an overlay beside it:

    mkdir -p overlay && cd overlay
    kustomize create --resources ../{plan.out.name}/kubernetes    # the path to this folder{overlay_image}
    kubectl apply -k .

## What to set first
- **The repository.** {load}
- **The image.** {image}
- **The GPU.** {gpu}
- **Replicas.** {plan.min_replicas} to {plan.max_replicas}, the autoscaler's range (`--min-replicas`, `--max-replicas`).

## The pods
Triton {NGC_RELEASE} with the arguments `ptqd serve` uses, its exit timeout {KUBERNETES_EXIT_S} s so requests
in flight finish when a pod stops. A startup probe on the sampler model's readiness gives the
server {plan.startup_failures() * PROBE_PERIOD_S} s to load the repository ({plan.repository_bytes / 1e6:.1f} MB; estimated at
{LOAD_BYTES_PER_S / 1e6:.0f} MB/s after {START_S} s) before liveness (`/v2/health/live`) and readiness
(`/v2/health/ready`) take over. `/dev/shm` is a memory-backed volume of {_mebibytes(plan.shm_bytes())}
(Kubernetes gives 64 MB, too little for the Python backend's tensors: the sampler's largest
answer, {int(plan.sampler.parameter('max_images') or 1)} images per request, and its calls to the other models, per instance); it
counts against the pod's memory ({_mebibytes(plan.memory_bytes())}, estimated). The pod runs as the image's
unprivileged user (uid {TRITON_UID}). A PodDisruptionBudget lets drains take one pod at a time.

## How the autoscaler sees its metrics
1. Each pod serves Prometheus metrics on port 8002 (`/metrics`), per model: the cumulative
   counters `nv_inference_queue_duration_us` and `nv_inference_compute_infer_duration_us`, the
   gauge `nv_inference_pending_request_count`.
2. Prometheus scrapes them, every minute or more often: through `optional/servicemonitor.yaml`
   (prometheus-operator; kube-prometheus-stack selects ServiceMonitors by its release label by
   default, add it in the overlay) or the pods' `prometheus.io/*` annotations.
3. prometheus-adapter, installed with `prometheus-adapter-values.yaml`, publishes two metrics
   per pod on the custom metrics API: `{HPA_METRIC}`, the rate of the sampler's queue time
   over the rate of its compute time ({RATE_WINDOW} window), and `{HPA_PENDING_METRIC}`, the
   requests waiting for a sampler instance. Check they arrive:
   `kubectl get --raw "/apis/custom.metrics.k8s.io/v1beta1/namespaces/NAMESPACE/pods/*/{HPA_METRIC}"`
4. The HPA (`hpa.yaml`, `autoscaling/v2`) keeps each per-pod average at {HPA_TARGET} and follows
   whichever asks for more pods: requests waiting as long as they compute, or a request
   waiting per pod, means the pods are full. (Triton counts a request's queue and compute time
   when it ends: requests longer than the window show only in the waiting count.) It adds one
   pod at a time (a new pod takes minutes to load its engines) and removes them slowly.

## KServe instead
`optional/kserve.yaml` is the same server as a KServe InferenceService on the
`{KSERVE_RUNTIME}` runtime (storageUri `{storage.uri}`: KServe mounts a claim, or downloads from
object storage with the credentials its own documentation describes) and the same HPA for the
Deployment KServe creates. Apply it instead of the base, not beside it; it is not in the
kustomization, so set its image by hand if you pushed one.
"""


def write_kubernetes(plan: Plan, dest: Path) -> list[str]:
    """Fill dest (a new folder) with the base; returns the files written."""
    files = manifest_files(plan)
    files["README.md"] = readme(plan)
    for name, text in files.items():
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    click.echo(f"[kubernetes] {', '.join(sorted(files))}: image {plan.image}, "
               + (f"GPU nodes {plan.gpu_product}" if plan.gpu_product else "no GPU")
               + f", repository {plan.storage.uri}")
    return sorted(files)
