"""Imported once by the fork server of tests/forked_cli.py: the libraries every model-loading
command imports first. No computation: a fork server that had run torch's thread pools would
hand its children a broken OpenMP runtime."""
import diffusers  # noqa: F401
import onnx  # noqa: F401
import onnxruntime  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: F401

import ptqd.cli  # noqa: F401
import ptqd.pipeline  # noqa: F401
import ptqd.calibration.stage  # noqa: F401
import ptqd.exporter.stage  # noqa: F401
import ptqd.sample  # noqa: F401
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401
