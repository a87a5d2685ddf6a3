"""Read pre-tokenized shards (written by :mod:`aion.tokenizers.pretokenize`) with numpy alone.

Kept apart from the writer so that training nodes load tokens without importing the survey
readers (h5py, astropy).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

INDEX_NAME = "index.json"


def load_token_index(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {INDEX_NAME}; expected a folder written by `aion tokenize`")
    return json.loads(path.read_text())


def load_token_shard(shard_dir: str | os.PathLike, mmap: bool = True) -> dict[str, np.ndarray]:
    """All arrays of one shard, memory-mapped by default."""
    shard_dir = Path(shard_dir)
    return {p.name[:-4]: np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
            for p in sorted(shard_dir.glob("*.npy"))}
