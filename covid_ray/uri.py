"""Storage URIs (``s3://bucket/prefix``, ``gs://…``): open, test and download them.

Plain ``pyarrow.fs`` underneath (it ships with Ray), no Ray here. A local path goes
through the same functions, so callers need no second code path.

Credentials and endpoints come from the environment the way each store's own tools
read them: for S3, an IAM instance profile or ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, and ``AWS_ENDPOINT_URL`` for an S3-compatible store
(MinIO, Ceph). Query parameters in the URI itself (``?endpoint_override=…``) are
refused: the experiment's paths are made by appending to the URI, which a query
string would break.

Downloads land in a *mirror*: a local folder derived from the URI alone
(``~/.cache/covid_ray/mirror/<scheme>/<bucket>/<key…>``, or ``$COVID_RAY_MIRROR``),
so a second machine or a second run finds the same folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

MIRROR_ENV = "COVID_RAY_MIRROR"
# What pyarrow.fs opens and Ray Train/Tune accept as storage_path.
SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "file")


def is_uri(path: str | Path | None) -> bool:
    return path is not None and "://" in str(path)


def check_uri(uri: str) -> str:
    """``uri`` without a trailing slash; a clear error for what the project cannot use.

    Raises:
        ValueError: a query string, or a scheme not in :data:`SCHEMES`.
    """
    if "?" in uri or "#" in uri:
        raise ValueError(
            f"{uri}: query parameters in a storage URI are not supported (paths are appended to it); "
            "give an S3-compatible endpoint as AWS_ENDPOINT_URL in the environment instead"
        )
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ValueError(f"{uri}: not a storage URI covid-ray can use (schemes: {', '.join(SCHEMES)})")
    return uri.rstrip("/")


def join(base: str, *parts: str) -> str:
    """``base/part/…`` for a URI or a path (a URI keeps its ``scheme://``)."""
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(uri_or_path: str | Path):
    """(pyarrow filesystem, path inside it) for a URI or a local path."""
    import pyarrow.fs as pafs

    if is_uri(uri_or_path):
        return pafs.FileSystem.from_uri(str(uri_or_path))
    return pafs.LocalFileSystem(), str(Path(uri_or_path).resolve())


def exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri_or_path: str | Path) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri_or_path)
    return fs.get_file_info(path).type == pafs.FileType.File


def open_input(uri_or_path: str | Path):
    """A binary file object to read (seekable: pandas and torch can read it directly)."""
    fs, path = filesystem(uri_or_path)
    return fs.open_input_file(path)


def read_text(uri_or_path: str | Path) -> str:
    """The whole text file at a URI or a path."""
    with open_input(uri_or_path) as f:
        return f.read().decode()


def write_text(uri_or_path: str | Path, text: str) -> None:
    """Write (replace) a text file at a URI or a path, creating its folder."""
    fs, path = filesystem(uri_or_path)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def mirror_dir(uri: str) -> Path:
    """The local folder that mirrors ``uri`` (derived from the URI alone)."""
    root = Path(os.environ.get(MIRROR_ENV) or Path.home() / ".cache" / "covid_ray" / "mirror")
    scheme, rest = uri.split("://", 1)
    parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
    return (root / scheme / Path(*parts)).resolve()


def fetch(uri: str, dest: Path | None = None) -> Path:
    """Download the file or folder at ``uri`` (once) and return the local copy.

    Meant for objects written once and never changed, such as checkpoint folders: a
    copy already in the mirror is reused. The copy is published by renaming a
    finished temporary folder, so an interrupted download is never mistaken for one.

    Raises:
        FileNotFoundError: nothing at ``uri``.
    """
    import pyarrow.fs as pafs

    dest = dest or mirror_dir(uri)
    if dest.exists():
        return dest
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"not found: {uri}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        target = tmp / dest.name
        if info.type == pafs.FileType.Directory:
            target.mkdir()  # copy_files makes the subfolders, not the top one
        pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            os.rename(target, dest)
        except OSError:  # another process published it first
            if not dest.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def download_file(uri: str, dest: Path) -> bool:
    """Copy the file at ``uri`` over ``dest`` (atomically); False when there is none."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    os.replace(tmp, dest)
    return True


def download_files(uri: str, names, dest: Path) -> list[str]:
    """Download ``uri/<name>`` to ``dest/<name>`` for each name there; returns those found."""
    return [name for name in names if download_file(join(uri, name), dest / name)]


def upload_dir(local: Path, uri: str) -> None:
    """Copy the folder ``local`` to ``uri`` (files there with the same names are replaced)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
