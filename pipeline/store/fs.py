"""Store locations: a local path or an object-store URI, resolved to a pyarrow filesystem."""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass
from typing import Iterator

import pyarrow.fs as pafs

from pipeline.errors import ConfigError, DataError

_HINTS = {
    errno.ENOSPC: "no space left on the device: free some or write the store elsewhere",
    errno.EDQUOT: "disk quota exceeded: free some or write the store elsewhere",
    errno.EFBIG: "the file is larger than this process may write (file size limit)",
    errno.EROFS: "the location is on a read-only filesystem: choose a writable --output",
    errno.EACCES: "permission denied: choose a writable --output (or fix its permissions)",
    errno.EPERM: "operation not permitted: choose a writable --output (or fix its permissions)",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
}


def describe_os_error(error: OSError) -> str:
    """One line for an OS/filesystem error: what failed and, when known, what to do about it."""
    text = " ".join(str(error).split())
    hint = _HINTS.get(error.errno or 0)
    if hint is None and "Bucket" in text and "not found" in text:
        hint = (
            "the bucket does not exist (create it first; for S3-compatible servers set AWS_ENDPOINT_URL, "
            "e.g. AWS_ENDPOINT_URL=http://127.0.0.1:9000)"
        )
    return f"{text} ({hint})" if hint else text


@contextlib.contextmanager
def io_errors(what: str) -> Iterator[None]:
    """Turn ``OSError`` raised inside into a :class:`DataError` ``"<what>: <reason> (<hint>)"``."""
    try:
        yield
    except DataError:
        raise
    except OSError as error:
        raise DataError(f"{what}: {describe_os_error(error)}") from error


@dataclass(frozen=True)
class Location:
    """A directory on a pyarrow filesystem (``path`` has no scheme and no trailing slash)."""

    filesystem: pafs.FileSystem
    path: str

    def join(self, name: str) -> str:
        return f"{self.path}/{name}" if self.path else name

    @property
    def display(self) -> str:
        """The location as a user wrote it: a local path, or ``s3://bucket/prefix``."""
        return self.path if self.is_local else f"{self.filesystem.type_name}://{self.path}"

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def exists(self, name: str) -> bool:
        return self.filesystem.get_file_info(self.join(name)).type == pafs.FileType.File

    def read_bytes(self, name: str) -> bytes:
        path = self.join(name)
        try:
            with self.filesystem.open_input_stream(path) as stream:
                return stream.read()
        except (FileNotFoundError, OSError) as error:
            raise DataError(f"cannot read {path}: {error}") from error

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``data`` under ``name`` atomically (temp name + rename locally; object stores make a
        single PUT visible only once complete, so no temp object is needed there)."""
        final = self.join(name)
        with io_errors(f"cannot write {final}"):
            if self.is_local:
                temp = final + ".tmp"
                with self.filesystem.open_output_stream(temp) as stream:
                    stream.write(data)
                self.filesystem.move(temp, final)
            else:
                with self.filesystem.open_output_stream(final) as stream:
                    stream.write(data)

    def delete(self, name: str) -> None:
        with io_errors(f"cannot delete {self.join(name)}"):
            self.filesystem.delete_file(self.join(name))

    def makedirs(self) -> None:
        with io_errors(f"cannot create the store location {self.display}"):
            self.filesystem.create_dir(self.path, recursive=True)

    def list_names(self) -> list[str]:
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        with io_errors(f"cannot list the store location {self.display}"):
            return sorted(info.base_name for info in self.filesystem.get_file_info(selector))


def resolve_location(uri: str, filesystem: pafs.FileSystem | None = None) -> Location:
    """``/abs/path``, ``relative/path``, ``file:///...``, ``s3://bucket/prefix`` -> :class:`Location`.

    With ``filesystem`` given (e.g. an ``S3FileSystem`` with an ``endpoint_override``), ``uri`` is a
    path on it; a ``s3://`` prefix is stripped.
    """
    if not uri:
        raise ConfigError("store location is empty")
    if filesystem is not None:
        path = uri.split("://", 1)[1] if "://" in uri else uri
        return Location(filesystem, path.rstrip("/"))
    if "://" not in uri:
        return Location(pafs.LocalFileSystem(), _abspath(uri))
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as error:
        raise ConfigError(f"cannot resolve store location {uri!r}: {error}") from error
    return Location(fs, path.rstrip("/"))


def _abspath(path: str) -> str:
    import os

    return os.path.abspath(path).rstrip("/") or "/"
