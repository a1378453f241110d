"""The model.py files of the Triton repository. They run inside Triton's Python backend (its
own interpreter, numpy and onnxruntime only), beside a copy of ptqd's numpy-only runtime
modules, and are never imported by ptqd itself."""
