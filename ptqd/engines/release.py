"""The NGC release that builds and serves engines: in one place, because a TensorRT plan
loads only in the TensorRT version that built it, so the build image (TensorRT container)
and the serving image (Triton container) must come from the same release."""

NGC_RELEASE = "25.12"
TENSORRT_IMAGE = f"nvcr.io/nvidia/tensorrt:{NGC_RELEASE}-py3"
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{NGC_RELEASE}-py3"
