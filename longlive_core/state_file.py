"""Our own state files (engine rollouts, trainer state): tensors in safetensors, everything else as
versioned JSON in the same file's header. Reading one never runs code, whatever the file holds.

A state is a tree of dicts, lists, tuples, str, int, float, bool, None and tensors. JSON has no tuples,
no int keys and no tensors, so those three are tagged (`$tuple`, `$int_keys`, `$tensor`: a name in the
safetensors part); a str key starting with `$` is refused when saving, so the tags cannot be forged by data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
from torch import Tensor

FORMAT = "longlive-state"
VERSION = 1  # of this encoding: bump on any change to the tags or the header keys


def save_state(state: dict[str, Any], path: str | Path) -> None:
    tensors: dict[str, Tensor] = {}
    tree = _encode(state, tensors)
    header = {"format": FORMAT, "version": str(VERSION), "state": json.dumps(tree)}
    safetensors.torch.save_file(tensors, str(path), metadata=header)


def load_state(path: str | Path) -> dict[str, Any]:
    """ValueError naming the file when it is not a state file of this version (a pickle, say)."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise ValueError("no longlive-state header")
            if header.get("version") != str(VERSION):
                raise ValueError(f"state file version {header.get('version')!r}, this code reads {VERSION}")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return _decode(json.loads(header["state"]), tensors)
    except (safetensors.SafetensorError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a state file this code wrote, refused unread: {e}") from e


def _encode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu().contiguous().clone()  # clone: no storage shared between two
        return {"$tensor": name}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if value and all(type(k) is int for k in value):
            return {"$int_keys": [[k, _encode(v, tensors)] for k, v in value.items()]}
        for key in value:
            if not isinstance(key, str) or key.startswith("$"):
                raise ValueError(f"state keys must be str not starting with '$', or all int; got {key!r}")
        return {k: _encode(v, tensors) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"a state holds plain data and tensors only, got {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    tags = [k for k in value if k.startswith("$")]
    if not tags:
        return {k: _decode(v, tensors) for k, v in value.items()}
    if len(value) != 1:
        raise ValueError(f"a tagged value has one key, got {sorted(value)}")
    ((tag, inner),) = value.items()
    if tag == "$tensor":
        return tensors[inner]
    if tag == "$tuple":
        return tuple(_decode(v, tensors) for v in inner)
    if tag == "$int_keys":
        return {int(k): _decode(v, tensors) for k, v in inner}
    raise ValueError(f"unknown tag {tag!r}")
