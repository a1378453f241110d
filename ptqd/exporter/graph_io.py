"""Writing graphs of any size: protobuf cannot serialize a message past 2 GiB (an FP32 Stable
Diffusion 1.5 UNet is ~3.4 GB), so a graph whose weights pass EXTERNAL_DATA_ABOVE keeps them
in one external-data file beside it (`<graph>.data`, layout.external_data_path). onnx.load,
onnx.checker (by path), ONNX Runtime, TensorRT's parser, trtexec and Polygraphy all find that
file next to the graph by the relative name recorded inside it, so a copy must keep the name.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx

from ptqd.runtime.layout import external_data_path

# initializer bytes past which a graph is written with external data: under protobuf's 2 GiB
# with room for the graph's structure. PTQD_EXTERNAL_DATA_ABOVE overrides it (tests force
# external data on small graphs with it).
EXTERNAL_DATA_ABOVE = 1_800_000_000
# tensors smaller than this stay inside the graph (scales, shapes: what lint and folding read)
INLINE_BELOW = 1024
# initializer bytes past which a single-file graph is written a tensor at a time: protobuf's
# SerializeToString of a 1.7 GB SDXL-layout graph grew the process by 5.8 GB (its growing
# buffer, then the bytes object), more than the graph itself
STREAM_ABOVE = 64_000_000


def _payload_bytes(tensor: onnx.TensorProto) -> int:
    """The length of a raw-data tensor's payload, from its type and dims: reading raw_data to
    measure it would copy it out of the message."""
    count = math.prod(tensor.dims)
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1):
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _is_weight(tensor: onnx.TensorProto) -> bool:
    """A tensor whose payload leaves the graph: into the data file, or out of a weightless view."""
    return tensor.HasField("raw_data") and _payload_bytes(tensor) >= INLINE_BELOW


def external_data_above() -> int:
    value = os.environ.get("PTQD_EXTERNAL_DATA_ABOVE")
    return EXTERNAL_DATA_ABOVE if value is None else int(value)


def weight_bytes(model: onnx.ModelProto) -> int:
    """The initializers' payload (what decides whether the graph fits one protobuf message)."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
    return total


def save_graph(model: onnx.ModelProto, path: Path) -> Path:
    """Write `model` to `path`, with its weights in `<path>.data` when they pass the threshold
    (a stale data file from an earlier write is removed). A model written with external data
    keeps pointing at that file for its large tensors (what every later pass reads of a written
    graph, its structure and small tensors, stays in memory); reading the payload back would
    hold it twice, for protobuf does not give a cleared field's memory back."""
    path = Path(path)
    data = external_data_path(path)
    data.unlink(missing_ok=True)
    size = weight_bytes(model)
    if size <= external_data_above():
        if size > STREAM_ABOVE:
            _write_streamed(model, path)
        else:
            onnx.save_model(model, str(path))
        return path
    # tensors are marked here rather than by save_model(save_as_external_data=True), whose
    # check for an existing data file looks in the working directory, not beside the graph
    from onnx.external_data_helper import set_external_data

    for tensor in model.graph.initializer:
        if _is_weight(tensor):
            set_external_data(tensor, data.name)
    onnx.save_model(model, str(path))
    return path


def _length_delimited(field: int, length: int) -> bytes:
    """The protobuf wire header of field `field` holding `length` bytes (wire type 2): the
    tag and the length, each a base-128 varint."""
    out = bytearray()
    for value in (field << 3 | 2, length):
        while value > 0x7F:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def _write_streamed(model: onnx.ModelProto, path: Path) -> None:
    """`model` written as one protobuf message without ever being serialized whole: the model
    without its initializers first, then each initializer as a message of its own holding
    only `graph.initializer` [that tensor]. Protobuf merges a repeated occurrence of an
    embedded message field and appends to its repeated fields, so every reader (onnx.load,
    ONNX Runtime, TensorRT's parser) reads the same model, the initializers in order."""
    graph_field = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    initializer_field = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    with open(path, "wb") as out:
        out.write(_without_initializers(model).SerializeToString())
        for tensor in model.graph.initializer:
            payload = tensor.SerializeToString()
            inner = _length_delimited(initializer_field, len(payload))
            out.write(_length_delimited(graph_field, len(inner) + len(payload)))
            out.write(inner)
            out.write(payload)


def _consolidate(model: onnx.ModelProto, scratch: Path, path: Path) -> None:
    """`model` as torch wrote it past 2 GiB (one file per tensor in `scratch`) written to `path`
    with every weight in one `<path>.data`, streamed a tensor at a time (the tensors under
    INLINE_BELOW go back inside the graph, as save_graph keeps them)."""
    from onnx.external_data_helper import ExternalDataInfo

    data = external_data_path(path)
    with open(data, "wb") as out:
        for tensor in model.graph.initializer:
            if not tensor.external_data:
                continue
            info = ExternalDataInfo(tensor)
            with open(scratch / info.location, "rb") as src:
                src.seek(info.offset or 0)
                payload = src.read(info.length) if info.length else src.read()
            if len(payload) < INLINE_BELOW:
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = payload
                continue
            offset = out.tell()
            out.write(payload)
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", offset), ("length", len(payload))):
                tensor.external_data.add(key=key, value=str(value))
    onnx.save_model(model, str(path))


def export_torch(export: Callable[[Path], None], path: Path,
                 output_dims: dict[str, list[int]] | None = None) -> None:
    """Run a torch.onnx exporter (`export(file)`) into a scratch folder beside `path`, then
    write the graph there: with save_graph, or for a graph past 2 GiB (torch writes one file per
    tensor) by streaming its tensors into one data file, never holding the weights in memory
    beside the torch model. output_dims: per graph output, its per-sample dims where the
    exporter could not tell them (a slice of the output, a hidden state taken from a tuple):
    written into the graph's output type behind its batch axis, so TensorRT and Triton see
    static shapes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        raw = Path(scratch) / path.name
        export(raw)
        model = onnx.load(str(raw), load_external_data=False)
        for output in model.graph.output:
            dims = output.type.tensor_type.shape.dim[1:]
            for dim, size in zip(dims, (output_dims or {}).get(output.name, [])):
                if dim.dim_value != size:
                    dim.dim_value = size   # replaces a symbolic dim_param
        if any(t.external_data for t in model.graph.initializer):
            external_data_path(path).unlink(missing_ok=True)
            _consolidate(model, Path(scratch), path)
        else:
            save_graph(model, path)


# where a weightless view says its payload is: no file of that name is ever written, so
# anything that tries to read a stripped tensor fails loudly instead of reading zeros
STRIPPED = "ptqd-weights-held-in-memory"


def _copy_fields(target, source, skip: str) -> None:
    """Every field of protobuf message `source` but `skip` into `target`."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        # protobuf 6 deprecates `label` for is_repeated, which protobuf 5 lacks
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` but its graph's initializers."""
    copy = onnx.ModelProto()
    _copy_fields(copy, model, skip="graph")
    _copy_fields(copy.graph, model.graph, skip="initializer")
    return copy


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without the payload of its large initializers: what shape inference
    and folding need (names, types, dims, the small shape tensors) serializes far under 2 GiB
    even for a Stable Diffusion UNet, whose full message protobuf refuses. Each stripped tensor
    is marked external at a location no file has. `model` itself is not touched: protobuf
    (upb) never gives a cleared field's bytes back to the message's arena, so stripping the
    payload in place and putting it back would hold every weight twice. `restore_weights`
    puts the payload into a model derived from the view (a pass's output that kept the
    tensors' names)."""
    view = _without_initializers(model)
    for tensor in model.graph.initializer:
        if _is_weight(tensor) and not tensor.external_data:
            stub = view.graph.initializer.add()
            _copy_fields(stub, tensor, skip="raw_data")
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value=STRIPPED)
        else:
            view.graph.initializer.add().CopyFrom(tensor)
    return view


def is_stripped(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and \
        any(e.key == "location" and e.value == STRIPPED for e in tensor.external_data)


def restore_weights(model: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """Give every stripped initializer of `model` (a weightless view, or a pass's output from
    one) the payload of `source`'s initializer of the same name, byte for byte."""
    originals = {t.name: t for t in source.graph.initializer}
    for tensor in model.graph.initializer:
        if is_stripped(tensor):
            original = originals.get(tensor.name)
            if original is None or not original.HasField("raw_data"):
                raise RuntimeError(f"initializer {tensor.name} lost its weights in a graph pass")
            del tensor.external_data[:]
            if original.HasField("data_location"):
                tensor.data_location = original.data_location
            else:
                tensor.ClearField("data_location")
            tensor.raw_data = original.raw_data
