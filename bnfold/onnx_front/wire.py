"""Read an ONNX file's structure without its tensor bytes, at the protobuf wire level.

Deciding whether an existing output is a model we may replace, or which data
files it references, needs the graph but not the megabytes of ``raw_data`` in
its initializers. Parsing the whole file with protobuf copies all of them
(0.1 s for a 100 MB model); here the file is memory-mapped and walked field by
field, the initializers' ``raw_data`` is skipped without being read, and only
what is left is handed to protobuf.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import onnx

# Field numbers (onnx.proto) and wire types this reader needs.
MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_RAW_DATA = 9
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


def model_skeleton(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The model in ``path`` with the ``raw_data`` of its main graph's initializers left out.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is not a well-formed protobuf message.
    """
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise ValueError("empty file")
        with (
            mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
            memoryview(mapped) as view,
        ):
            stripped, problem = _stripped_model(view)
    if problem:
        raise ValueError(problem)
    try:
        return onnx.ModelProto.FromString(stripped)
    except Exception as err:  # protobuf's DecodeError, and others on odd input
        raise ValueError(f"not a model protobuf ({err})") from None


def _stripped_model(model: memoryview) -> tuple[bytes, str]:
    """(the model without initializer bytes, "") or (b"", what is wrong with it).

    Errors are returned, not raised: a traceback would keep slices of the mapped
    file alive, and the file could not be unmapped.
    """
    try:
        return _rewrite(model, {MODEL_GRAPH: _strip_initializers}), ""
    except ValueError as err:
        return b"", str(err)


def _strip_initializers(graph: memoryview) -> bytes:
    return _rewrite(graph, {GRAPH_INITIALIZER: _strip_raw_data})


def _strip_raw_data(tensor: memoryview) -> bytes:
    return _rewrite(tensor, {TENSOR_RAW_DATA: None})


def _rewrite(message: memoryview, nested: dict) -> bytes:
    """``message`` re-encoded: fields in ``nested`` rewritten by their function, or dropped (None).

    Every other field is copied through as it is, in its original order.
    """
    pieces: list[bytes | memoryview] = []
    for number, wire_type, start, body, end in _fields(message):
        if number not in nested or wire_type != LENGTH_DELIMITED:
            pieces.append(message[start:end])
            continue
        rewrite = nested[number]
        if rewrite is None:
            continue
        inner = rewrite(message[body:end])
        pieces += [_varint((number << 3) | LENGTH_DELIMITED), _varint(len(inner)), inner]
    return b"".join(pieces)


def _fields(message: memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, field end) of each field.

    Raises:
        ValueError: a truncated field, an unknown wire type or field number 0.
    """
    pos, size = 0, len(message)
    while pos < size:
        start = pos
        key, pos = _read_varint(message, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == VARINT:
            _, pos = _read_varint(message, pos)
            body = start
        elif wire_type == LENGTH_DELIMITED:
            length, body = _read_varint(message, pos)
            pos = body + length
        elif wire_type in (FIXED64, FIXED32):
            body, pos = pos, pos + (8 if wire_type == FIXED64 else 4)
        else:  # groups (3, 4) are not used by onnx.proto; 6 and 7 do not exist
            raise ValueError(f"wire type {wire_type}")
        if pos > size:
            raise ValueError("truncated field")
        yield number, wire_type, start, body, pos


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
