"""Full-precision ONNX export of the denoiser (a UNet or a diffusion transformer): the graph
every quantized graph is derived from.

The TorchScript-based exporter is used on purpose: it writes one self-contained file and
names every node after the module that produced it (`/unet/down_blocks.0/resnets.0/conv1/Conv`,
`/transformer/transformer_blocks.0/attn1/to_q/MatMul`: the denoiser sits in the wrapper under
its family's name), which is how the QDQ pass finds a layer's node by name rather than by
position.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ptqd.families import family_of_module
from ptqd.runtime.layout import INPUT_NAMES, OUTPUT_NAME

OPSET = 21


class DenoiserForExport(torch.nn.Module):
    """(sample [N,C,H,W], timestep [N] float32, *conditioning) -> eps; the graph's whole
    interface. Conditioning inputs (encoder_hidden_states [N,L,D], class_labels [N] int64,
    text_embeds, time_ids, ...) follow in the order `names` gives, each with the batch axis
    first; the family makes the call (nesting added_cond_kwargs) and takes eps out of the
    output (a learned-variance transformer's first C channels), so the graph outputs eps."""

    def __init__(self, denoiser: torch.nn.Module, names: tuple[str, ...] = ()):
        super().__init__()
        self.family, self.names = family_of_module(denoiser), names
        self.add_module(self.family.denoiser, denoiser)   # node names start /unet/ or /transformer/

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *conditioning: torch.Tensor) -> torch.Tensor:
        denoiser = getattr(self, self.family.denoiser)
        return self.family.forward(denoiser, sample, timestep, **dict(zip(self.names, conditioning)))


def example_inputs(denoiser, batch: int = 2, conditioning: dict | None = None) -> tuple[torch.Tensor, ...]:
    shape = family_of_module(denoiser).sample_shape(denoiser.config)
    sample = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    extra = tuple(torch.from_numpy(v[:batch]) for v in (conditioning or {}).values())
    return (sample, torch.linspace(999, 1, batch), *extra)


def export_fp_onnx(denoiser: torch.nn.Module, path: Path, conditioning: dict | None = None) -> Path:
    """The FP32 graph; `conditioning` holds example conditioning inputs (batch >= 2) for a
    conditional denoiser, and names the graph's extra inputs."""
    import onnx

    from ptqd.exporter.graph_io import export_torch

    names = tuple(conditioning or {})
    dynamic = {name: {0: "batch"} for name in (*INPUT_NAMES, *names, OUTPUT_NAME)}

    def export(file: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(DenoiserForExport(denoiser, names).eval(), example_inputs(denoiser, 2, conditioning),
                              str(file),
                              input_names=[*INPUT_NAMES, *names], output_names=[OUTPUT_NAME],
                              opset_version=OPSET, dynamic_axes=dynamic, dynamo=False,
                              do_constant_folding=True)

    # eps has the sample's shape (a learned-variance transformer's output is sliced to it);
    # the graph is checked from its file, not held here beside the torch model
    export_torch(export, path, {OUTPUT_NAME: family_of_module(denoiser).sample_shape(denoiser.config)})
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.shape_inference.InferenceError:
        _fold_branches(path)
    return path


def _fold_branches(path: Path) -> None:
    """Where the TorchScript exporter cannot tell a dimension's size it writes `squeeze(dim)`
    as an If (squeeze when it is 1); PixArt's output squeeze is one, and the If's untaken
    branch fails ONNX's strict shape inference although the graph runs. Folding constants
    (onnx-graphsurgeon, shapes known) decides the If and leaves the graph that runs; it is
    checked again in full."""
    import onnx

    from ptqd.exporter.cleanup import fold_and_clean
    from ptqd.exporter.graph_io import save_graph

    save_graph(fold_and_clean(onnx.load(str(path)))[0], path)
    onnx.checker.check_model(str(path), full_check=True)


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _weighted_nodes(model, initializers: set[str]) -> list:
    return [node for node in model.graph.node
            if node.op_type in WEIGHTED_OPS and len(node.input) >= 2 and node.input[1] in initializers]


def denoiser_name(model) -> str:
    """The name the denoiser has in an FP graph's node scopes: `unet`, `transformer`."""
    initializers = {init.name for init in model.graph.initializer}
    scopes = [node.name.split("/")[1] for node in _weighted_nodes(model, initializers)
              if node.name.startswith("/") and node.name.count("/") > 1]
    if not scopes:
        raise ValueError("the graph has no weighted node in a module scope: not a ptqd denoiser graph")
    return max(set(scopes), key=scopes.count)


CONV_OPS = ("Conv", "ConvTranspose")


def node_kind(node) -> str:
    """The layer kind (runtime.formats.LAYER_KINDS) of a layer's ONNX node."""
    return "conv" if node.op_type in CONV_OPS else "linear"


def layer_nodes(model) -> dict[str, object]:
    """Map each Conv/Linear module name (as in the denoiser's named_modules()) to its ONNX node.

    Conv and Gemm keep the parameter's name on their weight initializer
    (`unet.down_blocks.0.resnets.0.conv1.weight`); a Linear exported as MatMul gets an
    anonymous transposed initializer, so it is found by its node's scope instead
    (`/unet/down_blocks.1/attentions.0/to_q/MatMul`). Activation-by-activation MatMuls
    (attention scores) have no initializer input and are not layers.
    """
    initializers = {init.name for init in model.graph.initializer}
    prefix = denoiser_name(model)
    found: dict[str, object] = {}
    for node in _weighted_nodes(model, initializers):
        weight = node.input[1]
        if weight.startswith(f"{prefix}.") and weight.endswith(".weight"):
            name = weight[len(prefix) + 1:-len(".weight")]
        elif node.name.startswith(f"/{prefix}/"):
            name = node.name[len(prefix) + 2:].rsplit("/", 1)[0].replace("/", ".")
        else:
            continue
        if name in found:
            raise ValueError(f"two ONNX nodes claim layer {name}: {found[name].name}, {node.name}")
        found[name] = node
    return found
