"""A bounds-checked look at a safetensors file before MLX reads it.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (tensor name
-> dtype, shape, [begin, end) byte offsets into the data that follows; plus "__metadata__"),
then the data. `check_file` walks that header in Python and refuses, naming the file and the
tensor, anything a reader would otherwise trust: a length past the end, JSON that is not an
object, unknown dtypes, shapes that do not match their byte ranges, ranges outside the data or
overlapping. Only the header is read.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER = 100_000_000  # the format's own limit on the JSON header


def check_file(path: Path) -> dict[str, dict]:
    """Raise ValueError naming `path` (and the tensor) unless it is a well-formed safetensors
    file; returns its tensor entries (name -> {"dtype", "shape", "data_offsets"})."""
    path = Path(path)
    size = path.stat().st_size

    def fail(what: str) -> ValueError:
        return ValueError(f"{path} is not a valid safetensors file: {what}; it may be truncated or corrupt")

    if size < 8:
        raise fail(f"only {size} bytes")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(MAX_HEADER, size - 8):
            raise fail(f"its header claims {n} bytes, but the file holds {size - 8} after the length")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise fail(f"its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise fail(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise fail(f"its __metadata__ is a JSON {type(metadata).__name__}, not an object")
    data_size = size - 8 - n
    ranges = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise fail(f"tensor {name!r} has entry {str(entry)[:80]} (needs dtype, shape, data_offsets)")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise fail(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise fail(f"tensor {name!r} has shape {shape!r} (needs a list of ints >= 0)")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise fail(f"tensor {name!r} has data_offsets {offsets!r} (needs [begin, end])")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise fail(f"tensor {name!r} lies at bytes [{begin}, {end}) of a {data_size}-byte data section")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise fail(f"tensor {name!r} ({dtype} {shape}) needs {math.prod(shape) * DTYPE_BYTES[dtype]} "
                       f"bytes but its range holds {end - begin}")
        ranges.append((begin, end, name))
    ranges.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise fail(f"tensors {n0!r} and {n1!r} overlap")
    return header
