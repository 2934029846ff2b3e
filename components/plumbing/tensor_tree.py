"""Nested training state saved as data only: a JSON file beside a safetensors file.

What `torch.save` would pickle (optimizer and scheduler state, RNG states, counters, an EMA) is a tree
of dicts, lists and tuples whose leaves are numbers, strings, tensors and numpy arrays. Here the
tensors and arrays go to `<name>.safetensors` and the rest to `<name>.json`, with a reference where
each tensor was. Loading builds only those types back: no file can make it construct an object or run
code, which any pickle can (`weights_only=True` narrows that, it does not remove it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.plumbing.errors import EaselError

# Markers for what JSON cannot say by itself. A dict with other keys (or non-string keys) is stored
# as a list of pairs under ITEMS, so a saved dict can never be mistaken for a marker.
TENSOR, ARRAY, TUPLE, ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"
MARKERS = {TENSOR, ARRAY, TUPLE, ITEMS}


def save_tree(folder: Path, name: str, tree: Any) -> None:
    """Write `tree` as `<folder>/<name>.json` and `<folder>/<name>.safetensors` (each via a temp file)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().to("cpu").contiguous()
            return {TENSOR: key}
        if isinstance(value, np.ndarray):
            key = f"t{len(tensors)}"
            tensors[key] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "ui" else value.copy())
            return {ARRAY: key, "dtype": value.dtype.str}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, tuple):
            return {TUPLE: [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and not MARKERS & value.keys():
                return {k: encode(v, f"{where}.{k}") for k, v in value.items()}
            return {ITEMS: [[encode(k, where), encode(v, f"{where}.{k}")] for k, v in value.items()]}
        if value is None or isinstance(value, bool | int | float | str):
            return value
        kind = type(value).__name__
        raise TypeError(f"{name}{where}: a {kind} cannot be saved as data (only numbers, text and tensors can)")

    document = encode(tree, "")
    folder.mkdir(parents=True, exist_ok=True)
    json_path, tensor_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    partial = tensor_path.with_name(f".{tensor_path.name}.{os.getpid()}.partial")
    save_file(tensors, str(partial))
    partial.replace(tensor_path)
    partial = json_path.with_name(f".{json_path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(document))
    partial.replace(json_path)


def load_tree(folder: Path, name: str) -> Any:
    """The tree `save_tree` wrote, tensors on the CPU. A missing, cut or altered file is an EaselError
    naming it."""
    from safetensors.torch import load_file

    json_path, tensor_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise EaselError(f"{path}: missing")
    check_safetensors(tensor_path)
    try:
        document = json.loads(json_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise EaselError(f"{json_path}: not JSON ({exc})") from None
    tensors = load_file(str(tensor_path))

    def tensor(key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in tensors:
            raise EaselError(f"{json_path}: refers to a tensor {key!r} that {tensor_path.name} does not hold")
        return tensors[key]

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if TENSOR in value:
            return tensor(value[TENSOR])
        if ARRAY in value:
            return tensor(value[ARRAY]).numpy().astype(np.dtype(str(value["dtype"])))
        if TUPLE in value:
            return tuple(decode(v) for v in value[TUPLE])
        if ITEMS in value:
            return {_hashable(decode(k)): decode(v) for k, v in value[ITEMS]}
        return {k: decode(v) for k, v in value.items()}

    return decode(document)


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def check_safetensors(path: Path) -> None:
    """Refuse (EaselError, naming the file) what is not a whole safetensors file, before any library
    reads it: an empty file, pickle bytes under a .safetensors name, a header that is not JSON, or one
    that places tensors past the end of the file (a truncated copy)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            why = "empty" if size == 0 else f"its header claims {length} bytes; the file has {size}"
            raise EaselError(f"{path}: not a safetensors file ({why}); is it whole, and not a pickle renamed?")
        try:
            header = json.loads(fh.read(length))
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
            raise EaselError(f"{path}: not a safetensors file (its header does not parse: {exc})") from None
    if 8 + length + end > size:
        raise EaselError(
            f"{path}: truncated: its tensors need {8 + length + end} bytes, the file has {size}; copy it again"
        )
