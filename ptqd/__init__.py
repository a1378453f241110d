"""ptqd: post-training quantization of diffusion models with PTQD's noise corrections,
shipped as QDQ ONNX graphs, TensorRT engines and a Triton model repository."""

__version__ = "0.1.0"
