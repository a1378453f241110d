"""Full-precision ONNX export of the UNet: the graph every quantized graph is derived from.

The TorchScript-based exporter is used on purpose: it writes one self-contained file and
names every node after the module that produced it (`/unet/down_blocks.0/resnets.0/conv1/Conv`),
which is how the QDQ pass finds a layer's node by name rather than by position.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ptqd.runtime.layout import INPUT_NAMES, OUTPUT_NAME

OPSET = 21
NODE_PREFIX = "/unet/"


class UNetForExport(torch.nn.Module):
    """(sample [N,C,H,W], timestep [N] float32, *conditioning) -> eps; the graph's whole
    interface. Conditioning inputs (encoder_hidden_states [N,L,D] or class_labels [N] int64)
    follow in the order `names` gives, each with the batch axis first."""

    def __init__(self, unet: torch.nn.Module, names: tuple[str, ...] = ()):
        super().__init__()
        self.unet, self.names = unet, names

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *conditioning: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, **dict(zip(self.names, conditioning))).sample


def example_inputs(unet, batch: int = 2, conditioning: dict | None = None) -> tuple[torch.Tensor, ...]:
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    sample = torch.randn(batch, cfg.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    extra = tuple(torch.from_numpy(v[:batch]) for v in (conditioning or {}).values())
    return (sample, torch.linspace(999, 1, batch), *extra)


def export_fp_onnx(unet: torch.nn.Module, path: Path, conditioning: dict | None = None) -> Path:
    """The FP32 graph; `conditioning` holds example conditioning inputs (batch >= 2) for a
    conditional UNet, and names the graph's extra inputs."""
    import onnx

    from ptqd.exporter.graph_io import export_torch

    names = tuple(conditioning or {})
    dynamic = {name: {0: "batch"} for name in (*INPUT_NAMES, *names, OUTPUT_NAME)}

    def export(file: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(UNetForExport(unet, names).eval(), example_inputs(unet, 2, conditioning), str(file),
                              input_names=[*INPUT_NAMES, *names], output_names=[OUTPUT_NAME],
                              opset_version=OPSET, dynamic_axes=dynamic, dynamo=False,
                              do_constant_folding=True)

    export_torch(export, path)
    onnx.checker.check_model(str(path), full_check=True)
    return path


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def layer_nodes(model) -> dict[str, object]:
    """Map each Conv/Linear module name (as in unet.named_modules()) to its ONNX node.

    Conv and Gemm keep the parameter's name on their weight initializer
    (`unet.down_blocks.0.resnets.0.conv1.weight`); a Linear exported as MatMul gets an
    anonymous transposed initializer, so it is found by its node's scope instead
    (`/unet/down_blocks.1/attentions.0/to_q/MatMul`). Activation-by-activation MatMuls
    (attention scores) have no initializer input and are not layers.
    """
    initializers = {init.name for init in model.graph.initializer}
    found: dict[str, object] = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        weight = node.input[1]
        if weight.startswith("unet.") and weight.endswith(".weight"):
            name = weight[len("unet."):-len(".weight")]
        elif node.name.startswith(NODE_PREFIX):
            name = node.name[len(NODE_PREFIX):].rsplit("/", 1)[0].replace("/", ".")
        else:
            continue
        if name in found:
            raise ValueError(f"two ONNX nodes claim layer {name}: {found[name].name}, {node.name}")
        found[name] = node
    return found
