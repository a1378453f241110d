"""What runs a deployed model, with numpy, onnxruntime and `tokenizers` alone: the output
directory's names (layout), the folded PTQD schedule and its timeline, the per-sample noise,
conditioning and classifier-free guidance, the prompt tokenizer, the sampler loop and the
ONNX Runtime engine.

Every stage above builds on it, and the Triton repository ships this package whole, so it
imports nothing of ptqd but itself and ptqd.errors (tests/test_layering.py holds it to that).
"""
