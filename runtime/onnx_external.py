"""Find the external-data files an ONNX model refers to, without the ``onnx`` package (not installed on devices).

A model's sha256 in the manifest covers ``model.onnx`` only; tensors stored as external data live in other files
that ONNX Runtime opens by the relative ``location`` written inside the model. The loader uses this list to refuse
locations leaving the model folder and to verify each file against its own manifest entry.

The protobuf wire format is walked along the ONNX schema (onnx.proto field numbers) to every TensorProto: graph
initializers, sparse initializers, node attributes (also in subgraphs of If/Loop/Scan), functions and training info.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

# message -> {field number: child message type}; only length-delimited fields that can lead to a TensorProto.
_SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_MAX_DEPTH = 64


class OnnxParseError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise OnnxParseError("truncated or oversized varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, value) of one message: a memoryview for length-delimited fields, else an int."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise OnnxParseError("length-delimited field runs past the end of its message")
            yield number, wire, data[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > len(data):
                raise OnnxParseError("fixed-size field runs past the end of its message")
        else:
            raise OnnxParseError(f"unsupported wire type {wire}")


def _tensor_location(data: memoryview) -> tuple[str, str | None]:
    """(tensor name, external-data location or None)."""
    name, location, external = "", None, False
    for number, wire, value in _fields(data):
        if wire == 2 and number == _TENSOR_NAME:
            name = bytes(value).decode("utf-8", "replace")
        elif wire == 2 and number == _TENSOR_EXTERNAL:
            entry = {n: bytes(v).decode("utf-8", "replace") for n, w, v in _fields(value) if w == 2}  # type: ignore[arg-type]
            if entry.get(1) == "location":
                location = entry.get(2, "")
        elif wire == 0 and number == _TENSOR_LOCATION:
            external = value == _EXTERNAL
    return name, location if (external or location is not None) else None


def _walk(data: memoryview, kind: str, depth: int, found: list[tuple[str, str]]) -> None:
    if depth > _MAX_DEPTH:
        raise OnnxParseError("messages nested too deeply")
    if kind == "tensor":
        name, location = _tensor_location(data)
        if location is not None:
            found.append((name, location))
        return
    children = _SCHEMA[kind]
    for number, wire, value in _fields(data):
        if wire == 2 and number in children:
            _walk(value, children[number], depth + 1, found)  # type: ignore[arg-type]


def external_data_locations(model_path: str | Path) -> list[tuple[str, str]]:
    """(tensor name, location) of every tensor stored as external data, in file order; raises OnnxParseError."""
    found: list[tuple[str, str]] = []
    _walk(memoryview(Path(model_path).read_bytes()), "model", 0, found)
    return found
