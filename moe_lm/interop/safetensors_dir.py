"""A local Hugging Face model directory's weights, read one tensor at a time.

`SafetensorsDir(path)` finds `model.safetensors`, or the shards that
`model.safetensors.index.json` names, and checks every file before anything is converted: each
shard opens (its header parses and its size covers every tensor the header lists), and the index
names only shards that exist. `shape(name)` / `dtype(name)` come from the headers alone;
`read(name)` opens the tensor's shard, copies that one tensor out and closes the file again, so no
memory map of a whole shard stays resident while a large model is converted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from moe_lm.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsDir:
    """The tensors of a HF model directory: names, shapes and dtypes, and one-at-a-time reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = self._shard_files()
        self._where: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype] = {}
        for file in self.files:
            self._scan(file)

    def _shard_files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{index} is not a safetensors index (no readable "
                                      f"weight_map: {err}). Restore it from the model's "
                                      "original files.") from err
            files = sorted({self.path / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shard(s) that are not in {self.path}: "
                                      f"{', '.join(missing[:4])}. Download the missing shards "
                                      "(every model-0000x-of-0000y.safetensors file).")
            return files
        single = self.path / SINGLE_NAME
        if single.is_file():
            return [single]
        raise CheckpointError(f"{self.path} holds neither {SINGLE_NAME} nor {INDEX_NAME}: pass "
                              "a local Hugging Face model directory with safetensors weights "
                              "(PyTorch .bin checkpoints are not read; convert them with "
                              "transformers' save_pretrained first).")

    def _scan(self, file: Path) -> None:
        try:
            with safe_open(str(file), framework="pt") as f:
                names = list(f.keys())
                for name in names:
                    view = f.get_slice(name)
                    self._shape[name] = tuple(view.get_shape())
                    self._dtype[name] = _DTYPES.get(view.get_dtype(), None)
                    self._where[name] = file
        except Exception as err:  # safetensors raises its own error types for bad files
            raise CheckpointError(f"Cannot read {file} ({type(err).__name__}: {err}): the file is "
                                  "truncated or not a safetensors file. Download it again.") from err
        size = file.stat().st_size
        if size < _data_end(file):
            raise CheckpointError(f"{file} is truncated ({size} bytes, its header needs "
                                  f"{_data_end(file)}). Download it again.")

    def names(self) -> list[str]:
        """Every tensor name of every shard, sorted."""
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of `name` (from the header; no data read)."""
        return self._shape[name]

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of `name` (from the header; no data read)."""
        return self._dtype[name]

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name`, copied into memory of its own (the shard is closed afterwards)."""
        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name)

    @property
    def nbytes(self) -> int:
        """The bytes of all tensors (what the model weighs in its stored dtype)."""
        total = 0
        for name, shape in self._shape.items():
            n = 1
            for d in shape:
                n *= d
            total += n * torch.empty((), dtype=self._dtype[name] or torch.uint8).element_size()
        return total


def _data_end(file: Path) -> int:
    """The file size a safetensors header promises: 8 + header length + the last data offset."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)
