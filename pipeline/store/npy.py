"""Decoding the ``.npy`` members of a feature store, checked: never unpickling, crc32 and finite values.

Headers are parsed with numpy's own ``np.lib.format`` readers (object dtypes refused) and the parse is
memoised per distinct header (all entries of a feature share one), which is what keeps the per-image
overhead at a few microseconds. Arrays are read-only views of the caller's buffer (no copy).
"""

from __future__ import annotations

import io
import zlib

import numpy as np

from pipeline.errors import DataError

# memoised .npy header parses: header bytes -> (dtype, shape, order, data offset, data bytes)
_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], str, int, int]] = {}


def _npy_header(data: np.ndarray, start: int, end: int, source: str) -> tuple[np.dtype, tuple[int, ...], str, int, int]:
    """(dtype, shape, order, data offset, data bytes) of the ``.npy`` bytes ``data[start:end]``."""
    head = data[start : min(end, start + 12)].tobytes()
    if head[:6] != b"\x93NUMPY" or len(head) < 10:
        raise DataError(f"{source}: not a plain .npy payload (no .npy magic)")
    if head[6] == 1:
        data_offset = 10 + int.from_bytes(head[8:10], "little")
    elif head[6] in (2, 3) and len(head) == 12:
        data_offset = 12 + int.from_bytes(head[8:12], "little")
    else:
        raise DataError(f"{source}: not a plain .npy payload (unsupported .npy version {head[6]}.{head[7]})")
    if start + data_offset > end:
        raise DataError(f"{source}: not a plain .npy payload (header longer than the payload)")
    header = data[start : start + data_offset].tobytes()
    parsed = _HEADERS.get(header)
    if parsed is None:
        stream = io.BytesIO(header)
        try:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except ValueError as error:
            raise DataError(f"{source}: not a plain .npy payload ({error})") from error
        if dtype.hasobject:
            raise DataError(f"{source}: not a plain .npy payload (object arrays are not allowed: they would need unpickling)")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        parsed = (dtype, tuple(shape), "F" if fortran_order else "C", data_offset, nbytes)
        if len(_HEADERS) < 1024:
            _HEADERS[header] = parsed
    return parsed


def npy_view(buffer: np.ndarray, start: int, end: int, source: str) -> np.ndarray:
    """The array in ``buffer[start:end]`` (a uint8 array) as a read-only view: no copy."""
    dtype, shape, order, data_offset, nbytes = _npy_header(buffer, start, end, source)
    if end - start - data_offset != nbytes:
        raise DataError(f"{source}: not a plain .npy payload ({end - start - data_offset} data bytes for {dtype}{shape})")
    array = np.ndarray(shape, dtype, buffer=buffer, offset=start + data_offset, order=order)
    array.flags.writeable = False
    return array


# float dtype -> (unsigned view, exponent mask): a value is NaN or +-inf exactly when its exponent bits
# are all ones. Testing the bits of an integer view runs ~14x faster than np.isfinite on fp16 (0.1 vs
# 1.5 ms for a 2 MiB SAM embedding here).
_EXPONENT_BITS = {"f2": ("u2", 0x7C00), "f4": ("u4", 0x7F800000), "f8": ("u8", 0x7FF0000000000000)}


def all_finite(array: np.ndarray) -> bool:
    """Whether every value of a numeric array is finite (integer arrays always are)."""
    if array.dtype.kind != "f":
        return True
    bits = _EXPONENT_BITS.get(array.dtype.str[1:])
    if bits is None:
        return bool(np.isfinite(array).all())
    unsigned, mask = bits
    view = array.view(array.dtype.str[0] + unsigned)
    return not bool(np.any(np.bitwise_and(view, mask) == mask))


def checked_view(buffer: np.ndarray, start: int, end: int, crc: int | None, where: str, uri: str, verify: bool) -> np.ndarray:
    """The array in ``buffer[start:end]`` (see :func:`npy_view`); with ``verify``, its bytes are
    compared with the index's ``crc`` (None: a shard written before checksums) and its values must
    be finite. ``where`` names shard, image and feature; ``uri`` is the store, for the verify hint."""
    if verify and crc is not None:
        actual = zlib.crc32(buffer[start:end])
        if actual != crc:
            raise DataError(
                f"{where} is corrupted (crc32 {actual:08x}, index says {crc:08x}); `refseg verify {uri}` lists "
                "every damaged entry; extract the store again into a new location"
            )
    array = npy_view(buffer, start, end, where)
    if verify and not all_finite(array):
        raise DataError(
            f"{where} has non-finite values (NaN or inf): refusing to read it; `refseg verify {uri}` lists "
            "every such entry; extract the store again into a new location"
        )
    return array


def decode_npy(data: bytes, source: str) -> np.ndarray:
    """``.npy`` bytes -> read-only array viewing ``data`` (no copy); never unpickles.

    The header is parsed with numpy's own ``np.lib.format`` readers; object dtypes are refused.
    """
    return npy_view(np.frombuffer(data, dtype=np.uint8), 0, len(data), source)

