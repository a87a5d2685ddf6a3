"""Atomic file-system steps shared by everything that saves a folder (tokenizers, flows)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def replace_directory(tmp: Path, directory: Path) -> None:
    """Move the finished folder ``tmp`` to ``directory``, replacing any old one: the old folder is moved
    aside first and deleted only after the new one is in place, so a crash leaves one complete folder."""
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
        os.replace(directory, old / directory.name)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
