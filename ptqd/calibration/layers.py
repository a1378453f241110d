"""What one UNet step does, measured by running the model once: the quantizable layers (Conv2d
and Linear) with their MACs, weights and activation sizes, and the float work around them
(normalization, activations, residual adds, the attention cores) for the latency model."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ptqd.devices import module_device, to_device
from ptqd.families import family_of_module

QUANTIZABLE = (nn.Conv2d, nn.Linear)
# arithmetic with a Python number (diffusers' `/ output_scale_factor`) becomes a constant in the
# graph that TensorRT fuses into the kernel producing the tensor: it moves nothing of its own
SCALAR_FUSED = {"add", "sub", "mul", "div", "true_divide", "truediv"}


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str            # "conv" or "linear"
    macs: int            # per sample, at the model's native resolution
    params: int = 0      # weight elements (the bias is left out: under 0.5 % of any layer's weights)
    in_elems: int = 0    # per sample, elements of the layer's input activation
    out_elems: int = 0   # per sample, elements of its output

    @property
    def width(self) -> int:
        """Its weight rows' width (a Linear's input features, a convolution's in_channels x kh x
        kw): the MACs per output element."""
        return self.macs // self.out_elems if self.out_elems else 0


@dataclass(frozen=True)
class AttentionCore:
    """softmax(Q K^T) V of one attention module, without its Q/K/V/output projections."""
    name: str
    macs: int            # per sample: Q K^T plus P V
    elems: int           # per sample: Q, K, V read and the output written, with the scores kept on chip


@dataclass(frozen=True)
class FloatOps:
    """The work of one step outside the Conv2d/Linear layers, per sample."""
    elems: int                              # elements read plus written by every other op, each op on its own
    attention: tuple[AttentionCore, ...]    # the score matmuls, one entry per attention module


def layer_kind(module: nn.Module) -> str:
    """The kind of a quantizable layer, as formats name them (runtime.formats.LAYER_KINDS)."""
    return "conv" if isinstance(module, nn.Conv2d) else "linear"


def quantizable_layers(unet: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in unet.named_modules() if isinstance(m, QUANTIZABLE)}


def _one_sample(unet: nn.Module, sample_shape: tuple[int, ...], conditioning: dict | None) -> tuple[tuple, dict]:
    device = module_device(unet)
    extra = {k: to_device(v[:1], device) for k, v in (conditioning or {}).items()}
    return (unet, torch.zeros(1, *sample_shape, device=device), torch.tensor([500.0], device=device)), extra


def _call(unet: nn.Module, call):
    """How the model runs: its family's forward (families.base.ModelFamily.forward), or `call`."""
    return call or family_of_module(unet).forward


@torch.no_grad()
def measure_layers(unet: nn.Module, sample_shape: tuple[int, ...],
                   conditioning: dict | None = None, call=None) -> list[LayerInfo]:
    """MACs, weights and activation sizes per sample of every Conv2d/Linear, measured by running
    the model once (with one sample's conditioning inputs for a conditional model); `call`
    (module, sample, timestep, **conditioning) runs it, by default as its family does."""
    infos: dict[str, LayerInfo] = {}
    hooks = []
    for name, module in quantizable_layers(unet).items():
        def hook(mod, inputs, output, name=name):
            batch = output.shape[0] if output.dim() > 1 else 1
            x_elems, y_elems = inputs[0].numel() // batch, output.numel() // batch
            kind = layer_kind(mod)
            if kind == "conv":
                macs = y_elems * mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            else:
                macs = y_elems * mod.in_features
            infos[name] = LayerInfo(name, kind, int(macs), mod.weight.numel(), int(x_elems), int(y_elems))
        hooks.append(module.register_forward_hook(hook))
    args, kwargs = _one_sample(unet, sample_shape, conditioning)
    try:
        _call(unet, call)(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return [infos[name] for name in quantizable_layers(unet) if name in infos]


def _is_attention(module: nn.Module) -> bool:
    # diffusers' Attention (and its variants) carry these; the projections are Linear children
    return all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "heads"))


def _attention_core(name: str, module: nn.Module, args: tuple, kwargs: dict) -> AttentionCore:
    hidden = args[0] if args else kwargs["hidden_states"]
    context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    # counts are per sample: the batch dimension is left out
    # a 4-D input (B, C, H, W) is attended over its H*W positions; a 3-D one is (B, L, C)
    queries = hidden.shape[2] * hidden.shape[3] if hidden.dim() == 4 else hidden.shape[1]
    keys = context.shape[1] if context is not None else queries
    qk_dim, v_dim = module.to_q.out_features, module.to_v.out_features   # heads x head size
    macs = queries * keys * (qk_dim + v_dim)
    elems = queries * qk_dim + keys * (qk_dim + v_dim) + queries * v_dim
    return AttentionCore(name, int(macs), int(elems))


def _scalar_arithmetic(func, inputs: list) -> bool:
    name = getattr(func, "__name__", "").strip("_")
    if name[:1] in ("r", "i") and name[1:] in SCALAR_FUSED:    # __radd__, __itruediv__, ...
        name = name[1:]
    return name in SCALAR_FUSED and len(inputs) == 1


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


class _Traffic(TorchFunctionMode):
    """Counts elements read and written by every tensor op while the innermost running module
    is one whose ops are float work (not a Conv/Linear, not an attention core)."""

    def __init__(self, stack: list[bool]):
        super().__init__()
        self.stack, self.elems = stack, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.stack and not self.stack[-1]:
            return out
        inputs = list(_tensors(args)) + list(_tensors(list((kwargs or {}).values())))
        if _scalar_arithmetic(func, inputs):
            return out
        in_place = getattr(func, "__name__", "").endswith("_")
        # views move nothing, and an op that hands back its input (dropout in eval, a no-op .to) did nothing
        if (isinstance(out, torch.Tensor) and not out._is_view()
                and (in_place or not any(out is t for t in inputs))):
            self.elems += sum(t.numel() for t in inputs) + out.numel()
        return out


@torch.no_grad()
def measure_float_ops(unet: nn.Module, sample_shape: tuple[int, ...],
                      conditioning: dict | None = None, call=None) -> FloatOps:
    """Per sample, the elements moved by the ops outside Conv2d/Linear (GroupNorm, SiLU, residual
    adds, concatenations, upsampling, ...) and the size of every attention core, measured by
    running the model once with batch 1."""
    stack: list[bool] = []   # per running module: do its own ops count as float traffic?
    cores: list[AttentionCore] = []
    residual = 0
    hooks = []
    for name, module in unet.named_modules():
        counts = not isinstance(module, QUANTIZABLE) and not _is_attention(module)

        def enter(mod, args, kwargs, name=name, counts=counts):
            stack.append(counts)
            if _is_attention(mod):
                cores.append(_attention_core(name, mod, args, kwargs))

        def leave(mod, args, output):
            nonlocal residual
            stack.pop()
            if (_is_attention(mod) and getattr(mod, "residual_connection", False)
                    and isinstance(output, torch.Tensor)):
                residual += 3 * output.numel() // output.shape[0]   # out = attention + input: 2 reads, 1 write
        hooks += [module.register_forward_pre_hook(enter, with_kwargs=True),
                  module.register_forward_hook(leave)]
    mode = _Traffic(stack)
    args, kwargs = _one_sample(unet, sample_shape, conditioning)   # made outside the count: not the model's work
    forward = _call(unet, call)
    try:
        with mode:
            forward(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return FloatOps(mode.elems + residual, tuple(cores))
