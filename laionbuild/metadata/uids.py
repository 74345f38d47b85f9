"""DataComp's uid arrays: each sample's 32-hex-digit `uid` as two unsigned 64-bit integers
(structured dtype `u8,u8`: the first 16 digits, then the last 16), sorted, saved with np.save:
the file DataComp's `baselines` write and its resharder reads (`--subset_file`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laionbuild.recipe.errors import InputError

UID_DTYPE = np.dtype("u8,u8")
_HEX = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _HEX[bytes([_c]).upper()[0]] = _i


def uid_array(uids: pa.Array | pa.ChunkedArray, where: str) -> np.ndarray:
    """The uids (strings of 32 hex digits) as DataComp's sorted `u8,u8` array; `where` names the
    column in the error for a uid that is not 32 hex digits."""
    uids = uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids
    if len(uids) == 0:
        return np.zeros(0, UID_DTYPE)
    uids = uids.cast(pa.string())
    valid = pc.fill_null(pc.match_substring_regex(uids, r"^[0-9a-fA-F]{32}$"), False)
    if not pc.all(valid).as_py():
        bad = uids.filter(pc.invert(valid))[0].as_py()
        raise InputError(f"{where}: uid {bad!r} is not 32 hexadecimal digits (DataComp's uids are)")
    offsets = np.frombuffer(uids.buffers()[1], np.int32)[uids.offset:uids.offset + len(uids) + 1]
    data = np.frombuffer(uids.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    digits = _HEX[data.reshape(len(uids), 32)].astype(np.uint64)
    out = np.zeros(len(uids), UID_DTYPE)
    for field, half in (("f0", digits[:, :16]), ("f1", digits[:, 16:])):
        value = np.zeros(len(uids), np.uint64)
        for i in range(16):
            value = (value << np.uint64(4)) | half[:, i]
        out[field] = value
    out.sort()
    return out
