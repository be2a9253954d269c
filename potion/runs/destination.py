"""Where a command's ``--out`` lies, and how its outputs get there.

Three kinds of ``--out``:

- a local path. Relative paths are resolved against the current folder, except inside a
  Ray job's unpacked copy of its working dir (``ray job submit --working-dir .``): that copy
  lives under the cluster's session folder and is deleted with it, so a path there is
  refused with what to pass instead;
- a remote URI (``s3://…``, ``gs://…``, ``hdfs://…``, ``file://…`` through pyarrow, or any
  scheme an installed fsspec package serves): the command builds its outputs in a local
  staging folder as usual and copies them up only when it succeeds, to a hidden name beside
  the target that is then moved into place (a rename where the filesystem has one; object
  stores have none, so there the last copy is not atomic).

``Destination`` is what a command prints: the absolute path or the URI, never a path that
only meant something inside a temporary folder.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from potion.errors import PotionError

# Ray's WorkingDirPlugin unpacks a job's working dir into
# <session>/runtime_resources/working_dir_files/_ray_pkg_<hash> and starts the entrypoint there.
RAY_COPY_PARENT = "working_dir_files"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def ray_job_copy(cwd: str | Path | None = None) -> Path | None:
    """The folder of the Ray job working-dir copy that ``cwd`` lies in, or None."""
    here = Path(cwd if cwd is not None else Path.cwd()).absolute()
    for folder in (here, *here.parents):
        if folder.parent.name == RAY_COPY_PARENT:
            return folder
    return None


@dataclass(frozen=True)
class Destination:
    """An output location: ``path`` (absolute, local) or ``uri`` (remote)."""
    path: Path | None = None
    uri: str | None = None

    @property
    def remote(self) -> bool:
        return self.uri is not None

    def __str__(self) -> str:
        return self.uri if self.uri is not None else str(self.path)

    def child(self, name: str) -> str:
        """Where the file ``name`` of this output folder lies, as the user reaches it."""
        return f"{self.uri.rstrip('/')}/{name}" if self.uri is not None else str(self.path / name)


def resolve_out(out: str | Path, flag: str = "--out", cwd: str | Path | None = None) -> Destination:
    """Parse ``--out``; refuse a location inside a Ray job's temporary working-dir copy."""
    text = str(out)
    if _SCHEME.match(text):
        _filesystem(text, flag)  # an unknown scheme or a malformed URI fails before any compute
        return Destination(uri=text)
    base = Path(cwd if cwd is not None else Path.cwd()).absolute()
    path = Path(text).expanduser()
    path = path if path.is_absolute() else base / path
    copy = ray_job_copy(base)
    # Ray's whole runtime_resources folder is its cache of job packages, pruned as it likes
    cache = copy.parent.parent.resolve() if copy is not None else None
    if cache is not None and (path.resolve() == cache or cache in path.resolve().parents):
        raise PotionError(
            f"{flag} {text} would be written inside this Ray job's temporary copy of its working dir ({copy}), "
            f"which the cluster deletes; pass an absolute path that you can read after the job (on a "
            f"multi-node cluster a filesystem every node mounts), e.g. {flag} /shared/{Path(text).name or 'out'}, "
            f"or a remote URI such as {flag} s3://BUCKET/{Path(text).name or 'out'}"
        )
    return Destination(path=path)


def _filesystem(uri: str, flag: str):
    """(pyarrow filesystem, path inside it) for ``uri``: pyarrow's own, else fsspec's."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 — pyarrow raises ArrowInvalid/OSError/ValueError by scheme
        native = str(e).splitlines()[0]
    scheme = _SCHEME.match(uri).group(1)
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as e:
        raise PotionError(f"{flag} {uri}: no filesystem for '{scheme}://' ({native}; fsspec: {e}); install the "
                          "package that serves it (e.g. s3fs, gcsfs) or pass a local path") from None
    except Exception as e:  # noqa: BLE001 — fsspec raises ValueError/KeyError for unknown protocols
        raise PotionError(f"{flag} {uri}: no filesystem serves '{scheme}://' ({e}); use s3://, gs://, hdfs://, "
                          "file:// or a scheme an installed fsspec package serves") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _split(path: str) -> tuple[str, str]:
    """(everything up to the last name, with its trailing slash; the last name)."""
    path = path.rstrip("/")
    name = path.rpartition("/")[2]
    return path[: len(path) - len(name)], name


def _check_remote(dest: Destination, overwrite: bool, folder: bool, flag: str):
    """Before any compute: the target is free (or ``overwrite``) and the place is writable."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(dest.uri, flag)
    parent, name = _split(path)
    if not name or not parent:  # a bare bucket: nowhere beside it to stage the outputs
        raise PotionError(f"{flag} {dest.uri} names no {'folder' if folder else 'file'}; add one, "
                          f"e.g. {dest.uri.rstrip('/')}/out")
    try:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.NotFound:
            if folder and info.type != pafs.FileType.Directory:
                raise PotionError(f"{flag} {dest.uri} exists and is not a folder; choose another {flag}")
            if not folder and info.type == pafs.FileType.Directory:
                raise PotionError(f"{flag} {dest.uri} is a folder; give {flag} a file name")
            if not overwrite and (not folder or fs.get_file_info(pafs.FileSelector(path))):
                raise PotionError(f"{dest.uri} already exists{' and is not empty' if folder else ''}; "
                                  f"choose another {flag} or pass --overwrite to replace it")
        if parent.strip("/"):
            fs.create_dir(parent.rstrip("/"), recursive=True)
        probe = f"{parent}.{name}.probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as f:
            f.write(b"")
        fs.delete_file(probe)
    except OSError as e:
        raise PotionError(f"cannot write {flag} {dest.uri} ({str(e).splitlines()[0]}); "
                          f"choose a location you can write, or check the credentials") from None
    return fs, path


@contextlib.contextmanager
def local_output(dest: Destination, overwrite: bool = False, *, folder: bool = True,
                 flag: str = "--out") -> Iterator[Path]:
    """The local path a command writes ``dest`` at; a remote ``dest`` is copied up afterwards.

    Local: ``dest.path`` itself (the command stages and swaps it in as usual). Remote: a path
    in a fresh temporary folder; whatever the command left there (its outputs, or a refusal's
    report) is uploaded when the block ends, even by an exception, and the folder removed.
    """
    if not dest.remote:
        yield dest.path
        return
    fs, path = _check_remote(dest, overwrite, folder, flag)
    tmp = Path(tempfile.mkdtemp(prefix="potion-out-"))
    local = tmp / _split(path)[1]
    try:
        yield local
    except BaseException as e:  # a message that names the local stand-in names the real place
        if e.args and isinstance(e.args[0], str):
            e.args = (e.args[0].replace(str(local.resolve()), dest.uri).replace(str(local), dest.uri), *e.args[1:])
        raise
    finally:
        try:
            if local.exists():
                _upload(local, fs, path, overwrite, dest.uri, flag)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _upload(local: Path, fs, path: str, overwrite: bool, uri: str, flag: str) -> None:
    import pyarrow.fs as pafs

    parent, name = _split(path)
    stage = f"{parent}.{name}.staging-{uuid.uuid4().hex[:8]}"
    old = f"{parent}.{name}.old-{uuid.uuid4().hex[:8]}"
    is_dir = local.is_dir()
    try:
        if is_dir:
            fs.create_dir(stage, recursive=True)  # copy_files does not create the top folder on every filesystem
            pafs.copy_files(str(local), stage, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        else:
            with open(local, "rb") as src, fs.open_output_stream(stage) as dst:
                shutil.copyfileobj(src, dst)
        exists = fs.get_file_info(path).type != pafs.FileType.NotFound
        if exists and not overwrite:
            left = uri.rstrip("/")[: -len(name)] + stage[len(parent):]
            raise PotionError(f"{uri} appeared while this command ran; its outputs were left at {left}")
        if exists:
            try:
                fs.move(path, old)
            except (OSError, NotImplementedError):  # object stores cannot rename a folder
                _delete(fs, path, is_dir)
                exists = False
        try:
            fs.move(stage, path)
        except (OSError, NotImplementedError):  # the same: copy it, then drop the staged copy
            pafs.copy_files(stage, path, source_filesystem=fs, destination_filesystem=fs)
            _delete(fs, stage, is_dir)
        if exists:
            _delete(fs, old, is_dir)
    except OSError as e:
        with contextlib.suppress(OSError):
            _delete(fs, stage, is_dir)
        raise PotionError(f"could not copy the outputs to {flag} {uri} ({str(e).splitlines()[0]}); "
                          "check the credentials and the space there, then rerun") from None


def _delete(fs, path: str, is_dir: bool) -> None:
    if is_dir:
        fs.delete_dir(path)
    else:
        fs.delete_file(path)
