"""Store locations: a local path or an object-store URI, resolved to a pyarrow filesystem."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.errors import ConfigError, DataError


@dataclass(frozen=True)
class Location:
    """A directory on a pyarrow filesystem (``path`` has no scheme and no trailing slash)."""

    filesystem: pafs.FileSystem
    path: str

    def join(self, name: str) -> str:
        return f"{self.path}/{name}" if self.path else name

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
        if self.is_local:
            temp = final + ".tmp"
            with self.filesystem.open_output_stream(temp) as stream:
                stream.write(data)
            self.filesystem.move(temp, final)
        else:
            with self.filesystem.open_output_stream(final) as stream:
                stream.write(data)

    def makedirs(self) -> None:
        self.filesystem.create_dir(self.path, recursive=True)

    def list_names(self) -> list[str]:
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
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
