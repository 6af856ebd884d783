"""Read safetensors files into numpy, bfloat16 included.

`safetensors`' own numpy loader rejects bfloat16 (numpy has no such dtype), and its flax loader
puts every tensor on the default JAX device. Checkpoints are parsed here on the host instead, with
`ml_dtypes.bfloat16`, memory-mapped, and with errors that name the file and the tensor.
The format: an 8-byte little-endian header size, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsError(ValueError):
    """The file is missing, truncated, too large or not a safetensors file."""


# The format's own readers refuse headers over 100 MB (safetensors' MAX_HEADER_SIZE): a header is
# JSON read whole into memory, so its size is checked before a byte of it is read.
MAX_HEADER_BYTES = 100_000_000


def _tensor_nbytes(path: str, name, info) -> tuple[int, int]:
    """(begin, end) of one header entry, after checking its types, dtype and size agree."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise SafetensorsError(f"{path}: header entry {name!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
    ints = lambda xs: isinstance(xs, list) and all(  # noqa: E731
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
    if not ints(shape) or not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise SafetensorsError(f"{path}: tensor {name!r} has a malformed shape or data_offsets")
    if offsets[1] - offsets[0] != math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize:
        raise SafetensorsError(f"{path}: tensor {name!r}: its data_offsets do not match its shape")
    return offsets[0], offsets[1]


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The tensor table of a safetensors file and the byte offset where its data starts.

    Reads only the 8-byte size and the JSON header: the header's size is checked (at most
    `MAX_HEADER_BYTES`, within the file) before it is read, and every tensor's declared bytes
    against the file before any is."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise SafetensorsError(f"{path}: header too large ({n} bytes declared; at most "
                                       f"{MAX_HEADER_BYTES}): not a safetensors file")
            if n > size - 8:
                raise SafetensorsError(f"{path}: header size {n} exceeds the file ({size} bytes): "
                                       "truncated")
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise SafetensorsError(f"{path}: no such file") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        _, end = _tensor_nbytes(path, name, info)
        if data_start + end > size:
            raise SafetensorsError(f"{path}: tensor {name!r} is truncated (it ends at byte "
                                   f"{data_start + end}, the file has {size})")
    return header, data_start


def dtype_of(info: dict) -> np.dtype:
    """The numpy dtype of a header entry (from `read_header`)."""
    return np.dtype(_DTYPES[info["dtype"]])


def load(path: str | os.PathLike, names: list[str] | None = None, *,
         header: tuple[dict, int] | None = None) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as read-only memory-mapped numpy arrays (nothing is read
    until a tensor is used). `header`: what `read_header` returned for this file."""
    header, data_start = header or read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name in header if names is None else names:
        info = header[name]
        begin, end = info["data_offsets"]
        buf = mm[data_start + begin:data_start + end]
        out[name] = buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def save(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Write numpy arrays (bfloat16 included) as a safetensors file."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, blobs = 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        blobs.append(arr.tobytes())
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
