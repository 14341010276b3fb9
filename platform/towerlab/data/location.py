"""Where a prepared dataset lives: a local directory or a filesystem URI (s3://, gs://, hdfs://, file://, or any
fsspec protocol), resolved once to a pyarrow filesystem plus a path inside it.

Every reader (manifest, checksum verification, evaluation splits, Ray Data's read_parquet / read_webdataset) goes
through the same (filesystem, path) pair, so a local path and a bucket URI take one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow.fs as pafs

from towerlab.config.errors import ConfigError


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    base: str  # the dataset directory inside `fs`, without a trailing slash
    display: str  # what the user wrote (absolute for local paths), for messages

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def name(self, rel: str) -> str:
        """The user-facing name of a file in the dataset (a URI stays a URI)."""
        return f"{self.display.rstrip('/')}/{rel}"


def resolve(path: str | os.PathLike) -> Location:
    """(filesystem, path) for a local directory or a URI; an unknown scheme is a ConfigError naming it."""
    text = str(path)
    if not is_uri(text):
        local = os.path.abspath(text)
        return Location(pafs.LocalFileSystem(), local, local)
    try:
        fs, base = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as arrow_error:  # pyarrow.ArrowInvalid is a ValueError
        # schemes pyarrow has no native filesystem for (memory://, az://, ...) come through fsspec
        try:
            import fsspec

            ffs, base = fsspec.core.url_to_fs(text)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"cannot open '{text}': {arrow_error}; {e} (use a local path, s3://, gs://, "
                              "hdfs:// or an installed fsspec protocol)") from None
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(ffs))
    return Location(fs, base.rstrip("/"), text)
