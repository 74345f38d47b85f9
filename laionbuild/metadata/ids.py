"""Id lists that pick rows of a source (LAION-Face's `laion_face_ids.pth`, flat lists).

- `.pth`/`.pt`: a torch-saved sequence indexed by part number; entry i holds the ids kept from
  part i (the format FacePerceiver/LAION-Face's convert_parquet.py reads). Loaded with
  `weights_only=True` (tensors, lists, numpy arrays; no arbitrary pickles).
- `.npy`: a flat array of ids; `.parquet`: the column `column` (or the only column);
  `.txt`: one id per line. Flat lists apply to every part.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laionbuild.recipe.errors import InputError


def local_copy(url: str) -> Path:
    """The id list on local disk: the path itself, or one copy per version the inputs check
    recorded (data/inputs/ids.json; project/inputs.local_copy): a republished list is fetched again."""
    from laionbuild.project.inputs import local_copy as copy

    return copy(url, "ids.json", "source.ids_url")


def safe_torch_load(path: Path):
    """A torch.save'd file with weights_only=True (no arbitrary pickle), numpy arrays allowed."""
    import torch

    safe = [np.ndarray, np.dtype, np.core.multiarray._reconstruct] + [
        type(np.dtype(t)) for t in ("int64", "int32", "uint64", "U1", "O", "float16", "float32", "float64")]
    with torch.serialization.safe_globals(safe):
        return torch.load(path, map_location="cpu", weights_only=True)


def _as_array(entry, path: Path, part: int) -> np.ndarray:
    if hasattr(entry, "numpy"):
        entry = entry.numpy()
    array = np.asarray(entry)
    if array.ndim != 1:
        raise InputError(f"{path}: entry for part {part} should be a flat list of ids, has shape {array.shape}")
    return array


def load_ids(url: str, part: int, column: str) -> tuple[np.ndarray, Path]:
    path = local_copy(url)
    suffix = path.suffix.lower()
    try:
        if suffix in (".pth", ".pt"):
            entries = safe_torch_load(path)
            if not hasattr(entries, "__len__") or isinstance(entries, (str, bytes)):
                raise InputError(f"{path}: expected a sequence indexed by part number, got {type(entries).__name__}")
            if len(entries) <= part:
                raise InputError(f"{path}: the id list has {len(entries)} entries (parts 0..{len(entries) - 1}); "
                                 f"part {part} has none (source.ids_url)")
            return _as_array(entries[part], path, part), path
        if suffix == ".npy":
            return _as_array(np.load(path, allow_pickle=False), path, part), path
        if suffix == ".parquet":
            table = pq.read_table(path)
            name = column if column in table.column_names else table.column_names[0]
            if len(table.column_names) > 1 and column not in table.column_names:
                raise InputError(f"{path}: no column `{column}` (source.ids_column); columns: {table.column_names}")
            return table.column(name).to_numpy(zero_copy_only=False), path
        if suffix == ".txt":
            return np.array([line.strip() for line in path.read_text().splitlines() if line.strip()]), path
    except (OSError, pa.ArrowInvalid, EOFError, RuntimeError) as exc:
        raise InputError(f"{path}: cannot read the id list: {exc}") from None
    raise InputError(f"{path}: unknown id list format `{suffix}` (use .pth, .npy, .parquet or .txt)")


def ids_table(url: str, part: int, column: str, target: pa.DataType) -> pa.Table:
    """The ids as a one-column table typed like the column they match."""
    ids, path = load_ids(url, part, column)
    try:
        array = pa.array(ids.tolist()).cast(target)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise InputError(f"{path}: ids do not convert to the type of `{column}` ({target}): {exc}") from None
    return pa.table({"id": array})
