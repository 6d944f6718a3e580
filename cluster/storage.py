"""Where a job's outputs go: a local path, a shared filesystem path or a pyarrow.fs URI.

The same rule as Ray Train's `storage_path`: `outputs/run1` (this machine; relative paths are made
absolute on the driver), `/mnt/shared/run1` (a filesystem every node mounts at that path), or a URI
such as `s3://bucket/run1`, `gs://bucket/run1` or `file:///mnt/shared/run1`. Whoever writes an
output goes through here: the driver (config, metrics, evaluation, TensorBoard, wandb), learner
rank 0 (policies: `final/`, `step_N/`), wherever on the cluster it runs: the driver hands it a
`Storage` (picklable), so roles never import this module. Writers prepare files in a local directory
(`writable_dir`); for a local path that directory is the destination itself, otherwise a temporary
one uploaded when it is closed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from rayrlhf.cluster.durable import fsync_tree


def is_uri(location: str) -> bool:
    return "://" in location


class Storage:
    """One output location: `join` names places inside it, `writable_dir` writes them."""

    def __init__(self, location: str | Path) -> None:
        self.keep: Callable[[str], bool] | None = None
        """Which files `readable_dir` downloads (None: all); see `only`."""
        location = str(location)
        if is_uri(location):
            self.location = location.rstrip("/")
            self.filesystem, self.root = pafs.FileSystem.from_uri(self.location)
        else:
            self.location = str(Path(location).expanduser().resolve())
            self.filesystem, self.root = pafs.LocalFileSystem(), self.location

    def __repr__(self) -> str:
        return f"Storage({self.location!r})"

    def __str__(self) -> str:
        return self.location

    def only(self, keep: Callable[[str], bool]) -> Storage:
        """This location, of which `readable_dir` downloads only the files whose relative path `keep`
        accepts (a picklable callable: the copy travels to the node that reads it). A path is read in
        place, whole: nothing to leave out there."""
        narrowed = Storage(self.location)
        narrowed.keep = keep
        return narrowed

    def child(self, *parts: str) -> Storage:
        """The storage of a place inside this one (`final`, `step_3`)."""
        return Storage(self.join(*parts))

    @property
    def local_path(self) -> Path | None:
        """The destination as a path, for a plain path; None for a URI, which is always written through
        pyarrow.fs (so `file://` behaves as `s3://` does, and tests can stand one in for the other)."""
        return None if is_uri(self.location) else Path(self.root)

    def shown(self, *parts: str) -> Path | str:
        """A place inside this one as a user opens it: a path for a plain path, the location for a URI."""
        return self.local_path.joinpath(*parts) if self.local_path is not None else self.join(*parts)

    def join(self, *parts: str) -> str:
        """The location of a place inside this one, as a string another process can open with `Storage`."""
        return "/".join([self.location, *parts])

    @contextmanager
    def writable_dir(self) -> Iterator[Path]:
        """A local directory whose contents end up at this location when the block ends without error."""
        if self.local_path is not None:
            self.local_path.mkdir(parents=True, exist_ok=True)
            yield self.local_path
            return
        staging = Path(tempfile.mkdtemp(prefix="rayrlhf-out-"))
        try:
            yield staging
            self.upload(staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @contextmanager
    def readable_dir(self) -> Iterator[Path]:
        """A local directory holding this location's contents for the block: the place itself for a
        path, a downloaded copy (removed afterwards) for a URI. Run on the node that reads it."""
        if self.local_path is not None:
            yield self.local_path
            return
        staging = Path(tempfile.mkdtemp(prefix="rayrlhf-in-"))
        try:
            self.download(staging, keep=self.keep)
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def download(self, local_dir: Path, keep: Callable[[str], bool] | None = None) -> None:
        """Copy the files here (those whose relative path `keep` accepts) into a local directory.

        A listed key that would land outside `local_dir` (`..` in it, or absolute: an object store
        stores such keys as they are) is refused, naming it, before anything is written."""
        selector = pafs.FileSelector(self.root, allow_not_found=True, recursive=True)
        inside = os.path.abspath(local_dir)
        copies = []
        for info in self.filesystem.get_file_info(selector):
            relative = info.path.removeprefix(self.root).lstrip("/")
            if info.type != pafs.FileType.File or (keep is not None and not keep(relative)):
                continue
            target = os.path.normpath(os.path.join(inside, relative))
            if not info.path.startswith(f"{self.root}/") or os.path.commonpath([inside, target]) != inside or target == inside:
                raise ValueError(f"{self.location}: the stored key {info.path!r} would be written outside "
                                 f"{local_dir}: refusing to download it")
            copies.append((info.path, Path(target)))
        for key, dest in copies:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with self.filesystem.open_input_stream(key) as stream, open(dest, "wb") as out:
                shutil.copyfileobj(stream, out)

    def list_dir(self, name: str = "") -> list[str]:
        """Names of what is directly inside a folder of this location ([] if there is none)."""
        folder = f"{self.root}/{name}".rstrip("/")
        selector = pafs.FileSelector(folder, allow_not_found=True)
        return sorted(info.base_name for info in self.filesystem.get_file_info(selector))

    def upload(self, local_dir: Path) -> None:
        """Copy a local directory's contents here (files already here and not in it stay)."""
        if self.local_path is not None and self.local_path.resolve() == Path(local_dir).resolve():
            return
        self.filesystem.create_dir(self.root, recursive=True)
        pafs.copy_files(str(local_dir), self.root, destination_filesystem=self.filesystem)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        path = f"{self.root}/{name}"
        self.filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.filesystem.open_output_stream(path) as out:
            out.write(data)

    def read_text(self, name: str) -> str:
        with self.filesystem.open_input_stream(f"{self.root}/{name}") as stream:
            return stream.read().decode()

    def remove(self, name: str) -> None:
        """Delete a file or folder inside this location, if it is there."""
        info = self.filesystem.get_file_info(f"{self.root}/{name}")
        if info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.filesystem.delete_file(info.path)

    def sync(self, name: str = "") -> None:
        """fsync every file and folder under a place here, when this location is a filesystem (a path,
        or a file:// URI); nothing for an object store, where an upload is durable once it returns."""
        place = Path(f"{self.root}/{name}".rstrip("/"))
        if isinstance(self.filesystem, pafs.LocalFileSystem) and place.exists():
            fsync_tree(place)

    def copy(self, source: str, destination: str, keep: Callable[[str], bool] | None = None) -> None:
        """Copy the files of a folder here (those whose path inside it `keep` accepts) to another folder
        here, one by one: an object store copies them itself, nothing passes through this process."""
        selector = pafs.FileSelector(f"{self.root}/{source}", allow_not_found=True, recursive=True)
        for info in self.filesystem.get_file_info(selector):
            relative = info.path.removeprefix(f"{self.root}/{source}/")
            if info.type == pafs.FileType.File and (keep is None or keep(relative)):
                target = f"{self.root}/{destination}/{relative}"
                self.filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
                self.filesystem.copy_file(info.path, target)

    def exists(self, name: str) -> bool:
        return self.filesystem.get_file_info(f"{self.root}/{name}").type != pafs.FileType.NotFound
