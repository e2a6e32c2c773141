"""Where files live: a local path, or a URL of any fsspec back-end (``gs://`` above all).

Every path a user gives goes through ``location``: a local path stays a ``pathlib.Path`` and
keeps the exact behaviour it always had (atomic renames, fsync); a URL stays a string, because
``Path("gs://b/x")`` silently becomes ``gs:/b/x``. The functions here take either, so a caller
never asks which one it holds.

Object stores have no rename: ``write_file`` uploads a finished local file in one request, and
an object becomes visible only when its upload is finalized, so a reader never sees half a
file under its final name (docs/checkpoints.md). They also have no appending and no locks;
``StagedDirectory`` keeps a run's log files in a local directory and uploads them at the
moments a run makes durable (each checkpoint, the end).

Failures of a back-end (an unknown scheme, a missing bucket, gcsfs not installed, no
credentials) become one-line ``StorageError``s naming the URL.
"""

import contextlib
import hashlib
import io
import os
import posixpath
import shutil
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple, Union

from retinanet_xla.errors import EXIT_INTERRUPTED, UserError

Location = Union[Path, str]  # a local path, or a URL such as gs://bucket/key
EXTRAS = {"gs": "gcs", "gcs": "gcs", "s3": "s3fs", "az": "adlfs", "abfs": "adlfs"}


@dataclass(frozen=True)
class ByteRange:
    """``length`` bytes of ``path`` from ``start`` (a record in a shard, data/records.py), with
    the CRC-32 they must have: reading checks both."""

    path: Location
    start: int
    length: int
    crc32: Optional[int] = None

    def __str__(self) -> str:
        return f"{self.path}[{self.start}:{self.start + self.length}]"


class StorageError(UserError):
    """A URL that cannot be used: unknown scheme, missing back-end, bucket or permission."""


class StorageUnavailable(StorageError):
    """The storage service did not answer, or answered that it is failing (after the back-end's
    own retries): not the user's mistake. Exit 75, "try again", as a preempted run: a rerun once
    it is back resumes from the last checkpoint."""

    exit_code = EXIT_INTERRUPTED


# Statuses a storage service gives while it is failing or overloaded, not for a wrong request.
_UNAVAILABLE_STATUSES = (408, 429, 500, 502, 503, 504)
_CONNECTION_ERRORS = frozenset(("ClientConnectionError", "ServerTimeoutError", "ServerDisconnectedError"))

# gcsfs sets no timeout on its requests: a server that accepts a connection and never answers
# held `train --output gs://...` silent for 7 minutes, until killed. Per-read limits, not a total,
# so that a large checkpoint's transfer may take as long as it needs while bytes flow. With
# gcsfs's six tries (waiting 1, 2, 4, 8 and 16 s between them) a silent server ends a command
# within 6 x 30 + 31 s, about 3.5 minutes. Set from the environment, not the config: the config
# itself may be in the bucket (docs/storage.md, "Time limits").
TIME_LIMITS = {"sock_connect": ("RETINANET_GCS_CONNECT_TIMEOUT", 20.0), "sock_read": ("RETINANET_GCS_READ_TIMEOUT", 30.0)}


def gcs_time_limits(environ=os.environ) -> Dict[str, float]:
    """aiohttp's per-request limits, in seconds: the defaults, or the environment's."""
    limits = {}
    for option, (variable, default) in TIME_LIMITS.items():
        text = environ.get(variable)
        try:
            limits[option] = float(text) if text is not None else default
        except ValueError:
            raise StorageError(f"{variable}={text!r}: expected a number of seconds") from None
        if not 0 < limits[option] < float("inf"):
            raise StorageError(f"{variable}={text!r}: expected a positive number of seconds")
    return limits


def _status(error: BaseException) -> Optional[int]:
    """The HTTP status a back-end's error carries (gcsfs: ``code``; aiohttp: ``status``)."""
    return getattr(error, "code", None) or getattr(error, "status", None)


def _unavailable(error: BaseException) -> bool:
    return (
        isinstance(error, (ConnectionError, TimeoutError))
        or _status(error) in _UNAVAILABLE_STATUSES
        or any(cls.__name__ in _CONNECTION_ERRORS for cls in type(error).__mro__)
    )


def is_url(path: Location) -> bool:
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def location(value: Union[str, os.PathLike]) -> Location:
    """A user's path: a URL as given (without a trailing slash), anything else a ``Path``."""
    text = os.fspath(value)
    if is_url(text):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = text[len("file://") :]
    return Path(text).expanduser()


def join(base: Location, *names: str) -> Location:
    if is_url(base):
        return posixpath.join(base, *names)
    return Path(base).joinpath(*names)


def parent(path: Location) -> Location:
    if is_url(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}" if "/" in rest else path
    return Path(path).parent


def name(path: Location) -> str:
    return posixpath.basename(path) if is_url(path) else Path(path).name


def stem(path: Location) -> str:
    return posixpath.splitext(name(path))[0] if is_url(path) else Path(path).stem


def _filesystem(url: str):
    """The fsspec file system for ``url`` (fsspec caches instances, and makes new ones in a
    forked data worker, whose parent's event loop it cannot use)."""
    import fsspec

    scheme = url.split("://", 1)[0]
    try:
        if scheme in ("gs", "gcs"):
            import aiohttp

            return fsspec.filesystem(scheme, requests_timeout=aiohttp.ClientTimeout(total=None, **gcs_time_limits()))
        return fsspec.filesystem(scheme)
    except ValueError:
        raise StorageError(
            f"{url}: unknown storage scheme {scheme}:// (use a local path, gs://, or another installed fsspec back-end)"
        ) from None
    except ImportError:
        extra = EXTRAS.get(scheme)
        hint = (
            f"pip install 'retinanet-xla[{extra}]'" if extra == "gcs" else f"pip install {extra or 'the fsspec back-end for it'}"
        )
        raise StorageError(f"{url}: reading {scheme}:// needs a package that is not installed: {hint}") from None


def describe_failure(url: str, error: BaseException) -> str:
    """One line for what a back-end raised: the status and its reason, never a traceback."""
    status = _status(error)
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    if status and text.endswith(f", {status}"):  # gcsfs's HttpError appends its status
        text = text[: -len(f", {status}")]
    kind = type(error).__name__
    if "DefaultCredentialsError" in kind or "RefreshError" in kind or status in (401, 403):
        return f"{url}: access denied ({text}); on a TPU VM check its service account, elsewhere run `gcloud auth application-default login`"
    if isinstance(error, FileNotFoundError):
        return f"{url}: no such object or bucket"
    return f"{url}: {text}" + (f" (HTTP {status})" if status else "")


def _remote(url: str, action: Callable, *args, **kwargs):
    """``action(fs, ...)`` with a back-end's errors turned into a ``StorageError``;
    ``FileNotFoundError`` passes through, since callers ask "is it there?" with it."""
    fs = _filesystem(url)
    try:
        return action(fs, *args, **kwargs)
    except (FileNotFoundError, StorageError):
        raise
    except Exception as error:  # gcsfs's HttpError, google.auth's errors, aiohttp's
        if _unavailable(error):
            raise StorageUnavailable(
                f"{describe_failure(url, error)}: the storage service is unavailable; run the same command again once it is back"
            ) from None
        raise StorageError(describe_failure(url, error)) from None


_BUCKETS_SEEN: Set[str] = set()


def _require_bucket(url: str) -> None:
    """A URL whose bucket does not exist is an error, not "no such file": the user mistyped it
    or cannot see it. (Checked once per bucket and process.)"""
    scheme, rest = url.split("://", 1)
    root = f"{scheme}://{rest.split('/', 1)[0]}"
    if root in _BUCKETS_SEEN:
        return
    _filesystem(url)  # an unknown scheme or a missing back-end, named with the whole URL
    if not _remote(root, lambda fs: fs.exists(root)):
        raise StorageError(f"{url}: bucket {root} does not exist (or this account cannot see it)")
    _BUCKETS_SEEN.add(root)


def exists(path: Location) -> bool:
    if not is_url(path):
        return Path(path).exists()
    _require_bucket(path)
    return _remote(path, lambda fs: fs.exists(path))


def is_file(path: Location) -> bool:
    if not is_url(path):
        return Path(path).is_file()
    _require_bucket(path)
    return _remote(path, lambda fs: fs.isfile(path))


def is_dir(path: Location) -> bool:
    """A local directory, or a URL with objects under it (object stores have no directories)."""
    if not is_url(path):
        return Path(path).is_dir()
    _require_bucket(path)
    return _remote(path, lambda fs: fs.isdir(path))


def glob(directory: Location, pattern: str) -> List[Location]:
    """Files in ``directory`` (not below) whose names match ``pattern``, sorted by name."""
    if not is_url(directory):
        return sorted(p for p in Path(directory).glob(pattern) if p.is_file()) if Path(directory).is_dir() else []
    scheme = directory.split("://", 1)[0]
    found = _remote(directory, lambda fs: fs.glob(posixpath.join(directory, pattern), detail=True))
    return sorted(f"{scheme}://{key.split('://', 1)[-1]}" for key, info in found.items() if info.get("type") == "file")


def files_below(directory: Location) -> Set[str]:
    """Every file's path relative to ``directory``, recursively: one listing, not one request
    per file (118k requests for COCO's images on a bucket)."""
    if not is_url(directory):
        root = Path(directory)
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    prefix = directory.split("://", 1)[1].rstrip("/") + "/"
    found = _remote(directory, lambda fs: fs.find(directory))
    return {item.split("://", 1)[-1][len(prefix) :] for item in found}


def read_bytes(path: Union[Location, ByteRange], at_most: Optional[int] = None) -> bytes:
    """The file's bytes; with ``at_most``, no more than that many plus one are read from a file
    (the caller sees from the length that it is longer), however long it is. A record's length
    is known: callers check it before reading."""
    if isinstance(path, ByteRange):
        return _read_range(path)
    if at_most is None:
        return _remote(path, lambda fs: fs.cat_file(path)) if is_url(path) else Path(path).read_bytes()
    if is_url(path):
        return _remote(path, lambda fs: fs.cat_file(path, start=0, end=at_most + 1))
    with open(path, "rb") as handle:
        return handle.read(at_most + 1)


def _read_range(item: ByteRange) -> bytes:
    end = item.start + item.length
    if is_url(item.path):
        data = _remote(item.path, lambda fs: fs.cat_file(item.path, start=item.start, end=end))
    else:
        with open(item.path, "rb") as handle:
            handle.seek(item.start)
            data = handle.read(item.length)
    if len(data) != item.length:
        raise ValueError(f"{item}: cut short ({len(data)} of {item.length} bytes): the shard is truncated")
    if item.crc32 is not None and zlib.crc32(data) != item.crc32:
        raise ValueError(f"{item}: checksum mismatch: the shard was damaged after it was written")
    return data


def size(path: Location) -> int:
    return _remote(path, lambda fs: fs.size(path)) if is_url(path) else Path(path).stat().st_size


def read_text(path: Location) -> str:
    return read_bytes(path).decode()


def read_many(paths: List[Location]) -> List[Union[bytes, Exception]]:
    """The bytes of every path, or the exception reading it raised. URLs are fetched
    concurrently (``FETCH_THREADS`` at a time): one object at a time from a bucket spends most
    of its time waiting for the first byte (docs/performance.md)."""

    def read(path: Location) -> Union[bytes, Exception]:
        try:
            return read_bytes(path)
        except (OSError, ValueError) as error:  # ValueError: StorageError, a damaged ByteRange
            return error

    if sum(is_url(p.path if isinstance(p, ByteRange) else p) for p in paths) < 2:
        return [read(p) for p in paths]
    return list(_fetch_pool().map(read, paths))


FETCH_THREADS = 16
_POOLS: Dict[int, ThreadPoolExecutor] = {}


def _fetch_pool() -> ThreadPoolExecutor:
    """This process's fetch threads (a forked data worker makes its own: threads do not fork)."""
    pool = _POOLS.get(os.getpid())
    if pool is None:
        pool = _POOLS[os.getpid()] = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="fetch")
    return pool


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file(path: Location, write: Callable[[io.BufferedWriter], None]) -> None:
    """Create ``path`` whole or not at all: ``write(handle)`` fills a temporary file, which is
    fsynced and renamed over ``path`` (local), or uploaded in one request (a URL: the object
    appears only when the upload is finalized). A failed write leaves nothing behind."""
    directory = None if is_url(path) else Path(path).parent
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if directory is None:
            upload_file(Path(temporary), path)
            os.unlink(temporary)
            return
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would hide it from the user's group
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    handle_of_directory = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle_of_directory)  # the rename itself survives a power cut
    finally:
        os.close(handle_of_directory)


def upload_file(local: Path, url: str) -> None:
    """A finished local file to ``url`` in one request: the object appears only when the upload
    is finalized."""
    _remote(url, lambda fs: fs.put_file(str(local), url))


def write_bytes(path: Location, data: bytes) -> None:
    write_file(path, lambda handle: handle.write(data))


def write_text(path: Location, text: str) -> None:
    write_bytes(path, text.encode())


def remove(path: Location) -> None:
    """Delete a file; one that is already gone is fine."""
    if not is_url(path):
        Path(path).unlink(missing_ok=True)
        return
    try:
        _remote(path, lambda fs: fs.rm_file(path))
    except FileNotFoundError:
        pass


def move(source: Location, target: Location) -> None:
    """Rename a file or a directory (on object storage: copy every object, then delete)."""
    if not is_url(source):
        Path(source).rename(target)
        return
    _remote(source, lambda fs: fs.mv(source, target, recursive=True))


def make_dirs(path: Location) -> None:
    """A local directory (object stores need none; a missing bucket is reported by ``is_dir``)."""
    if not is_url(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def require_writable(target: Location) -> None:
    """``target`` can take the files a command is about to write, checked before any work: a
    local directory is created and a file written and removed in it; a URL's bucket exists.
    Else one ``StorageError`` naming it (an evaluation lost the detections it had computed)."""
    if is_url(target):
        _require_bucket(target)
        return
    try:
        Path(target).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write-check-"):
            pass
    except OSError as error:
        raise StorageError(f"{target}: cannot write there ({error.strerror or error})") from None


@contextlib.contextmanager
def written_through(target: Location) -> Iterator[Path]:
    """A local directory to write files into that end up in ``target``: ``target`` itself when
    it is local; for a URL, a temporary directory whose files are uploaded when the block ends
    without an error (export artefacts, predictions, which their writers want as local files)."""
    require_writable(target)
    if not is_url(target):
        yield Path(target)
        return
    with tempfile.TemporaryDirectory(prefix="retinanet-xla-upload-") as scratch:
        yield Path(scratch)
        for path in sorted(Path(scratch).rglob("*")):
            if path.is_file():
                upload_file(path, join(target, str(path.relative_to(scratch))))


class StagedDirectory:
    """A directory written through a local one: the directory itself when it is local; for a
    URL, a per-URL folder under the local cache whose files ``push`` uploads (those changed
    since the last push) and ``pull`` downloads. Logs that are appended line by line
    (``metrics.jsonl``) and TensorBoard's event files live here: object stores cannot append."""

    def __init__(self, target: Location, cache_root: Optional[Path] = None):
        self.target = target
        if is_url(target):
            root = cache_root or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retinanet-xla" / "staging"
            digest = hashlib.sha256(target.encode()).hexdigest()[:16]
            self.local = root / f"{name(target)}-{digest}"
        else:
            self.local = Path(target)
        self._pushed: Dict[str, Tuple[int, int]] = {}

    @property
    def remote(self) -> bool:
        return is_url(self.target)

    def _files(self) -> Iterable[Path]:
        return (p for p in sorted(self.local.rglob("*")) if p.is_file() and not p.name.startswith("."))

    def pull(self, names: Iterable[str]) -> None:
        """Replace the local copies of ``names`` (files or folders) with the remote ones."""
        if not self.remote:
            return
        for entry in names:
            local = self.local / entry
            if local.is_dir():
                shutil.rmtree(local)
            else:
                local.unlink(missing_ok=True)
            url = join(self.target, entry)
            files = [url] if is_file(url) else [join(url, rel) for rel in sorted(files_below(url))] if is_dir(url) else []
            for remote in files:
                relative = remote[len(self.target) + 1 :]
                (self.local / relative).parent.mkdir(parents=True, exist_ok=True)
                (self.local / relative).write_bytes(read_bytes(remote))
        self._pushed = {str(p.relative_to(self.local)): self._stamp(p) for p in self._files()}

    @staticmethod
    def _stamp(path: Path) -> Tuple[int, int]:
        stat = path.stat()
        return stat.st_mtime_ns, stat.st_size

    def push(self) -> List[str]:
        """Upload every file changed since the last push; returns their relative names."""
        if not self.remote:
            return []
        uploaded = []
        for path in self._files():
            relative = str(path.relative_to(self.local))
            stamp = self._stamp(path)
            if self._pushed.get(relative) == stamp:
                continue
            upload_file(path, join(self.target, relative))
            self._pushed[relative] = stamp
            uploaded.append(relative)
        return uploaded
