"""Writes that survive a crash of the machine: fsync files and the folders that name them.

A rename is atomic, but only what was fsynced before it is sure to be on disk after a power loss:
without it the new name can survive while the file's data does not. Light to import (no pyarrow):
jobs/run/checkpoint.py and the run lock use it."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync one file or folder (a read-only descriptor is enough on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(top: Path) -> None:
    """fsync `top` (a file, or a folder and everything under it, deepest first), then the folder
    holding it: what a rename that publishes `top` needs for its contents to be on disk before its name."""
    for folder, _, files in os.walk(top, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))
    if not Path(top).is_dir():
        fsync_path(Path(top))
    fsync_path(Path(top).parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Write-fsync-rename, then fsync the folder: a reader sees the old file or the new one, whole,
    and after a crash the new one is there with its data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
