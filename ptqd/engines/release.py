"""The NGC release that builds and serves engines: in one place, because a TensorRT plan
loads only in the TensorRT version that built it, so the build image (TensorRT container)
and the serving image (Triton container) must come from the same release."""

NGC_RELEASE = "25.12"
TENSORRT_IMAGE = f"nvcr.io/nvidia/tensorrt:{NGC_RELEASE}-py3"
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{NGC_RELEASE}-py3"
# The same server with the Python packages a repository may need beside numpy (onnxruntime for
# graphs run without TensorRT, tokenizers for prompts): docker/Dockerfile.serve's first stage,
# built by `docker/gpu_pipeline.sh triton-image`. Not on any registry: push it to yours.
TRITON_RUNTIME_IMAGE = f"ptqd-triton:{NGC_RELEASE}"
