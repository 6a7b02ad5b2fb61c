"""The safetensors file format, read and written with NumPy alone.

A file is an 8-byte little-endian header length, a JSON header (each tensor's dtype,
shape and byte range; an optional `__metadata__` of strings) padded with spaces to a
multiple of 8, then the tensors' bytes. Written here so that jlora needs no extra
dependency, bfloat16 and float8 round-trip through `ml_dtypes` (which JAX ships), and
a file jlora writes twice from the same tensors is the same bytes: tensors are laid
out in name order.
"""

from __future__ import annotations

import json
import os
import struct
import sys

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
assert sys.byteorder == "little", "safetensors I/O here assumes a little-endian host"


def save(file: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Writes `tensors` (name -> array) to `file`, in name order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, order = 0, sorted(tensors)
    for name in order:
        x = tensors[name]
        if x.dtype not in _NAMES:
            raise TypeError(
                f"safetensors: tensor {name!r} has unsupported dtype {x.dtype}."
            )
        header[name] = {
            "dtype": _NAMES[x.dtype],
            "shape": list(x.shape),
            "data_offsets": [offset, offset + x.nbytes],
        }
        offset += x.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())  # little-endian hosts


def load(file: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """`(tensors, metadata)` from a safetensors file.

    Raises:
      ValueError: a malformed file (the message says what is wrong).
    """
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file}: not a safetensors file (shorter than 8 bytes).")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{file}: not a safetensors file (header length {n}).")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e}).") from None
        data = f.read()
    if not isinstance(header, dict):
        raise ValueError(f"{file}: corrupt safetensors header (not an object).")
    metadata = header.pop("__metadata__", None) or {}
    tensors, spans = {}, []
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{file}: tensor {name!r} has an unreadable header entry {info!r}."
            ) from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= begin <= end <= len(data) or end - begin != nbytes:
            raise ValueError(
                f"{file}: tensor {name!r} ({info['dtype']}{list(shape)}) has byte range "
                f"[{begin}, {end}) that does not fit its shape or the file."
            )
        spans.append((begin, end, name))
        count = nbytes // dtype.itemsize
        x = np.frombuffer(data, dtype=dtype, count=count, offset=begin)
        tensors[name] = x.reshape(shape)
    spans.sort()
    for (_, end0, a), (begin1, _, b) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise ValueError(f"{file}: tensors {a!r} and {b!r} overlap in the file.")
    return tensors, metadata
