"""Where a job folder lives: a local path, or any pyarrow filesystem URI (``s3://``, ``gs://``, ...).

``open_storage(location)`` gives the one object through which the writer, the job folder, .status.json,
show, export and the Ray replicas read and write a job folder (``storage_of`` takes a location or a
``Storage`` already open, and opens local files through ``open_local``). Names are flat file names inside the
folder (``.manifest.json``, ``shard-00001.parquet``...). Two implementations, with these guarantees:

``LocalStorage`` (a path, or a ``file://`` URI, which is the same folder): the behaviour batchllm always
had. ``replace`` and ``write_new`` write ``.NAME.tmp``, fsync it, rename it over ``NAME`` and fsync the
directory: a reader sees the old file or the whole new one, whenever the process dies, and a renamed
file survives a power loss. ``write_direct`` writes a name in place and fsyncs it (for hidden names that
mean nothing until the manifest lists them: a crash may leave them partial, never listed); ``promote``
renames one name to another (``os.replace``, directory fsynced). The folder lock is an ``flock`` on ``.batchllm.lock``: exclusive, and the
kernel drops it when its process dies, however it dies.

``ArrowStorage`` (any other URI, through ``pyarrow.fs.FileSystem.from_uri``, or a scheme registered with
``register_filesystem``): on object stores (S3, GCS, Azure; the in-memory mock) every file is written
once, whole, by one PUT (``open_output_stream`` then close): the store makes an object visible only
when its upload completes, so a reader sees the old object or the whole new one, and there is no
rename (an object store's "rename" is a copy plus a delete, neither atomic nor cheap). Caveats, kept
honest: (1) an upload that fails part-way through a multi-part shard may still complete with partial
content when the stream is closed; that shard is not listed in the manifest, so it is an orphan that is
never read and is deleted by the next writer (only the manifest decides what is committed, and the
manifest is small: one part, one PUT). (2) There is no fsync: durability is the store's once the PUT
returns. On filesystems whose rename is atomic (``local``) ArrowStorage writes a temporary and
renames it, as LocalStorage does. HDFS is refused: its move deletes the target before renaming.
``promote`` on an object store is a server-side copy then a delete of the source: the target appears
whole (one object) and a crash between the two leaves both, which the writer settles from the source.

The lock of an ArrowStorage folder is a lease (``Lease``): an object ``.batchllm.lock`` naming its
holder, renewed every ``ttl / 4`` seconds by a background thread, taken over by another process only
once it has not been renewed for ``ttl`` seconds (``Lease``'s argument, default 60). It is advisory:
nothing on the store stops a process that ignores it, and mutual exclusion rests on (a) the store being
strongly consistent (S3, GCS and Azure are), (b) an acquirer re-reading the lease ``settle`` seconds
after writing it (two processes racing for a free lease: the one whose write landed last wins, the
other sees it and refuses), (c) host clocks agreeing to well within ``ttl``, and (d) a holder never
stalling longer than ``ttl`` between its check and its next write (``Lease.check`` before every
shard and manifest write notices a lost lease and stops the job). A holder also counts its lease lost
once it has gone ``ttl - ttl/4`` seconds (monotonic clock) without a confirmed renewal, so a renewal
thread that stalled or kept failing never writes over a newer holder's lease. Shards written under a
lease carry a per-run tag in their names, so a run that lost its lease and still writes late can
never replace a shard the new holder committed. After a process is killed, its folder
stays locked until its lease expires: a resume within ``ttl`` seconds of the kill is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import IO, Any

from batchllm.errors import BatchLLMError

LOCK = ".batchllm.lock"
LEASE_TTL_S = 60.0  # a lease's default time to live (``Lease``'s ``ttl``)
LEASE_SETTLE_S = 1.0  # wait between writing a lease and re-reading it (see the module docstring)

_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_RENAME_IS_ATOMIC = {"local"}  # pyarrow filesystem type names whose move() is a rename
# HDFS: pyarrow's move deletes the target and then renames (not atomic), and an overwrite truncates
# first: neither way replaces the manifest atomically, so such folders are refused.
_REFUSED_SCHEMES = {"hdfs", "viewfs"}
_FACTORIES: dict[str, Callable[[str], tuple[Any, str]]] = {}
_ATOMIC_RENAME: dict[str, bool] = {}  # register_filesystem's atomic_rename, by scheme, where it was given

Hook = Callable[[str], None]


def is_uri(location: str) -> bool:
    """``scheme://...`` (a URI), as opposed to a local path."""
    return bool(_URI_RE.match(str(location)))


def register_filesystem(scheme: str, factory: Callable[[str], tuple[Any, str]] | None, *,
                        atomic_rename: bool | None = None) -> None:
    """Make ``scheme://`` URIs resolve through ``factory(uri) -> (pyarrow FileSystem, path)``, e.g. an
    fsspec filesystem wrapped in ``pyarrow.fs.PyFileSystem(FSSpecHandler(...))``, or an in-memory one
    in tests. ``None`` removes the registration. Applies in this process only (not in Ray replicas).

    ``atomic_rename``: whether job folders there are written through a temporary and a rename (True) or
    as write-once objects (False); None judges by the filesystem's type (``ArrowStorage``). Registering
    ``file`` with pyarrow's own resolver and ``atomic_rename=False`` gives a local folder object-store
    semantics (write-once objects, a lease): how tests run those code paths across processes."""
    _ATOMIC_RENAME.pop(scheme, None)
    if factory is None:
        _FACTORIES.pop(scheme, None)
        return
    _FACTORIES[scheme] = factory
    if atomic_rename is not None:
        _ATOMIC_RENAME[scheme] = atomic_rename


def open_storage(location: str, opener: Callable[..., IO[bytes]] = open) -> Storage:
    """The storage of the job folder at ``location`` (a path or a URI). ``opener`` opens local files
    (``LocalStorage`` only); raises BatchLLMError when a URI names no usable filesystem."""
    location = str(location)
    if not is_uri(location):
        return LocalStorage(location, opener)
    scheme = location.split("://", 1)[0].lower()
    if scheme in _REFUSED_SCHEMES:
        raise BatchLLMError(f"cannot use {location} as an output folder: HDFS has no atomic replace (its move "
                            "deletes the target first), so a crash could lose the manifest; use a local or "
                            "mounted folder, or an object store")
    if scheme in _FACTORIES:
        fs, path = _FACTORIES[scheme](location)
        return ArrowStorage(fs, path, location, atomic_rename=_ATOMIC_RENAME.get(scheme))
    if scheme == "file":
        return LocalStorage(_file_uri_path(location), opener, location)
    try:
        from pyarrow import fs as pafs

        fs, path = pafs.FileSystem.from_uri(location)
    except (OSError, ValueError, ImportError) as e:  # unknown scheme (ArrowInvalid), credentials, region lookup
        raise BatchLLMError(f"cannot open output folder {location}: {e}") from None
    return ArrowStorage(fs, path, location)


def open_local(path: str, mode: str) -> IO[bytes]:
    """How ``storage_of``'s local folders open the files they write: ``open``. A test patches this name
    to simulate a full disk."""
    return open(path, mode)


def storage_of(output_dir: str | Storage) -> Storage:
    """The storage of a job folder given as a path, a URI or already a ``Storage``."""
    if isinstance(output_dir, Storage):
        return output_dir
    # looked up at call time, so a patched ``open_local`` is the one used
    return open_storage(output_dir, opener=lambda path, mode: open_local(path, mode))


def _file_uri_path(uri: str) -> str:
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise BatchLLMError(f"{uri}: a file:// URI must name a local path (file:///abs/path)")
    return unquote(parsed.path)


class Storage:
    """A job folder. ``location`` is what the user gave (for messages and resume commands).

    Contract of every implementation: ``replace`` and ``write_new`` are all-or-nothing for readers (old
    content or the whole new one); ``write_new`` is for names written once (shards) and calls
    ``hook(phase)`` at its test phases; ``remove`` ignores a missing name; ``read_bytes`` returns None for
    a missing name; I/O failures raise OSError."""

    location: str

    def ensure_folder(self) -> None:
        raise NotImplementedError

    def writable(self) -> bool:
        """False when the folder is known to be read-only (local permission bits); True otherwise (an
        object store tells only on the first write)."""
        return True

    def names(self) -> list[str]:
        raise NotImplementedError

    def sizes(self) -> dict[str, int]:
        """Every file in the folder with its size in bytes, from one listing (the fast integrity check
        of ``batchllm.jobs.integrity`` compares them with the manifest's)."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes | None:
        raise NotImplementedError

    def open_input(self, name: str) -> Any:
        """A readable, seekable file (for ``pyarrow.parquet.read_table``); the caller closes it."""
        raise NotImplementedError

    def replace(self, name: str, data: bytes) -> None:
        """Write ``name`` whole, over an existing object (a reader sees the old or the new bytes)."""
        self.write_new(name, data)

    def write_new(self, name: str, data: bytes, hook: Hook | None = None) -> None:
        raise NotImplementedError

    def write_direct(self, name: str, data: bytes) -> None:
        """Write ``name`` in place, durably once it returns (fsync locally; one PUT on an object store).
        A crash part-way may leave it partial: only for names nothing reads until it is listed (pending
        shards). A failure removes what was written and raises OSError."""
        raise NotImplementedError

    def promote(self, src: str, dst: str) -> None:
        """Give ``src``'s bytes the name ``dst`` and drop ``src``: a reader of ``dst`` sees no file or the
        whole one. Raises OSError."""
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def lock(self) -> FolderLock | Lease:
        raise NotImplementedError

    def locked(self) -> bool:
        """Whether some live process holds the folder's lock (for ``batchllm show``)."""
        raise NotImplementedError

    def display(self, name: str) -> str:
        return f"{self.location.rstrip('/')}/{name}"


# ------------------------------------------------------------------------------------------- local


class LocalStorage(Storage):
    def __init__(self, root: str, opener: Callable[..., IO[bytes]] = open, location: str | None = None):
        self.root = root
        self.location = location or root
        self._open = opener

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def display(self, name: str) -> str:
        return self._path(name) if self.location == self.root else super().display(name)

    def ensure_folder(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    def writable(self) -> bool:
        return os.access(self.root, os.W_OK | os.X_OK)

    def names(self) -> list[str]:
        return os.listdir(self.root)

    def sizes(self) -> dict[str, int]:
        out = {}
        with os.scandir(self.root) as it:
            for e in it:
                try:
                    if e.is_file():
                        out[e.name] = e.stat().st_size
                except OSError:  # removed while listing
                    pass
        return out

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def read_bytes(self, name: str) -> bytes | None:
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def open_input(self, name: str) -> Any:
        return open(self._path(name), "rb")

    def write_new(self, name: str, data: bytes, hook: Hook | None = None) -> None:
        """Temporary file, fsync, rename, directory fsync: the name appears whole or not at all."""
        hook = hook or _no_hook
        final, tmp = self._path(name), self._path(f".{name}.tmp")
        try:
            with self._open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            hook("shard-written")
            os.replace(tmp, final)
        except BaseException:
            _remove_quietly(tmp)
            raise
        _fsync_dir(self.root)
        hook("shard-renamed")

    def write_direct(self, name: str, data: bytes) -> None:
        path = self._path(name)
        try:
            with self._open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _remove_quietly(path)
            raise
        _fsync_dir(self.root)

    def promote(self, src: str, dst: str) -> None:
        os.replace(self._path(src), self._path(dst))
        _fsync_dir(self.root)

    def remove(self, name: str) -> None:
        _remove_quietly(self._path(name))

    def lock(self) -> FolderLock:
        return FolderLock(self.root)

    def locked(self) -> bool:
        try:
            fd = os.open(self._path(LOCK), os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the shared lock we may have taken
        return False


def _fsync_dir(path: str) -> None:
    # the rename itself is durable only once the directory entry is flushed
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _no_hook(phase: str) -> None:
    pass


class FolderLock:
    """An exclusive ``flock`` on ``DIR/.batchllm.lock``: one writer per job folder.

    The kernel drops the lock when the process dies, however it dies, so a killed job never leaves a
    stale lock behind.
    """

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BatchLLMError(f"another batchllm process is writing to {os.path.dirname(self.path)}") from None
        self._fd = fd

    def holds(self) -> bool:
        """An flock is held until released: the kernel never takes it from a live process."""
        return True

    def check(self) -> None:
        """Nothing to check: an flock cannot be lost while its process lives."""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ------------------------------------------------------------------------------------------- arrow


class ArrowStorage(Storage):
    """A folder on a pyarrow ``FileSystem`` (``path``: the folder inside it, as ``from_uri`` gives it).

    ``atomic_rename``: write a temporary and rename it (True) or write each file once, whole (False);
    by default True only for filesystems whose move is a rename (local, hdfs)."""

    def __init__(self, fs: Any, path: str, location: str, atomic_rename: bool | None = None):
        self.fs = fs
        self.root = path.rstrip("/")
        self.location = location
        self.atomic_rename = _rename_is_atomic(fs) if atomic_rename is None else atomic_rename

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if self.root else name

    def _info(self, name: str):
        return self.fs.get_file_info(self._path(name))

    def ensure_folder(self) -> None:
        from pyarrow import fs as pafs

        if self.root and self.fs.get_file_info(self.root).type != pafs.FileType.Directory:
            self.fs.create_dir(self.root, recursive=True)

    def names(self) -> list[str]:
        from pyarrow import fs as pafs

        sel = pafs.FileSelector(self.root, allow_not_found=True, recursive=False)
        return [i.base_name for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]

    def sizes(self) -> dict[str, int]:
        from pyarrow import fs as pafs

        sel = pafs.FileSelector(self.root, allow_not_found=True, recursive=False)
        return {i.base_name: i.size for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File}

    def exists(self, name: str) -> bool:
        from pyarrow import fs as pafs

        return self._info(name).type == pafs.FileType.File

    def read_bytes(self, name: str) -> bytes | None:
        if not self.exists(name):
            return None
        try:
            with self.fs.open_input_stream(self._path(name)) as f:
                return f.read()
        except FileNotFoundError:  # deleted between the two calls
            return None

    def open_input(self, name: str) -> Any:
        return self.fs.open_input_file(self._path(name))

    def _put(self, path: str, data: bytes) -> None:
        # one write then close: on an object store the object appears at close, whole (see the module
        # docstring for what a failure part-way through a multi-part upload can leave)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def write_new(self, name: str, data: bytes, hook: Hook | None = None) -> None:
        hook = hook or _no_hook
        if not self.atomic_rename:
            self._put(self._path(name), data)
            hook("shard-written")
            return
        tmp = self._path(f".{name}.tmp")
        try:
            self._put(tmp, data)
            hook("shard-written")
            self.fs.move(tmp, self._path(name))
        except BaseException:
            self.remove(f".{name}.tmp")
            raise
        hook("shard-renamed")

    def write_direct(self, name: str, data: bytes) -> None:
        try:
            self._put(self._path(name), data)
        except BaseException:
            self.remove(name)
            raise

    def promote(self, src: str, dst: str) -> None:
        if self.atomic_rename:
            self.fs.move(self._path(src), self._path(dst))
            return
        self.fs.copy_file(self._path(src), self._path(dst))  # the target appears whole: one object
        self.fs.delete_file(self._path(src))

    def remove(self, name: str) -> None:
        try:
            self.fs.delete_file(self._path(name))
        except (FileNotFoundError, OSError):
            pass

    def lock(self) -> Lease:
        return Lease(self)

    def locked(self) -> bool:
        holder = Lease(self).holder()
        return holder is not None and not Lease.expired(holder)


def _rename_is_atomic(fs: Any) -> bool:
    while fs.type_name == "subtree":  # a SubTreeFileSystem renames as its base does
        fs = fs.base_fs
    return fs.type_name in _RENAME_IS_ATOMIC


class Lease:
    """The advisory lock of an ``ArrowStorage`` folder: the object ``.batchllm.lock`` holding
    ``{"token", "host", "pid", "acquired_at", "renewed_at", "ttl"}`` (see the module docstring for
    what it guarantees and what it cannot)."""

    def __init__(self, storage: ArrowStorage, ttl: float = LEASE_TTL_S, settle: float | None = None):
        self.storage = storage
        self.ttl = float(ttl)
        self.settle = LEASE_SETTLE_S if settle is None else settle
        self.token = uuid.uuid4().hex
        self._acquired_at = 0.0
        self._held = False
        self._lost: str | None = None
        self._renewed = 0.0  # time.monotonic() of the last confirmed write of our lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------- reading

    def holder(self) -> dict[str, Any] | None:
        """The lease object's content, or None when there is none (an unparsable one counts as none: a
        lease is only ever written whole). A failed read raises OSError: it says nothing about the lease."""
        try:
            data = self.storage.read_bytes(LOCK)
        except FileNotFoundError:
            return None
        if not data:
            return None
        try:
            obj = json.loads(data)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    @staticmethod
    def expired(holder: dict[str, Any], now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return now - float(holder.get("renewed_at") or 0) > float(holder.get("ttl") or LEASE_TTL_S)

    def _busy(self, holder: dict[str, Any]) -> BatchLLMError:
        age = time.time() - float(holder.get("renewed_at") or 0)
        return BatchLLMError(
            f"another batchllm process is writing to {self.storage.location} (lease held by {holder.get('host')} "
            f"pid {holder.get('pid')}, renewed {age:.0f} s ago; a lease not renewed for {float(holder.get('ttl') or 0):.0f} s "
            "expires, e.g. after a killed job)")

    # ----------------------------------------------------------------------------------------- holding

    def _write(self) -> None:
        now = time.time()
        obj = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
               "acquired_at": self._acquired_at or now, "renewed_at": now, "ttl": self.ttl}
        self.storage.replace(LOCK, json.dumps(obj).encode())
        self._renewed = time.monotonic()

    def _fresh(self) -> bool:
        """Whether our last confirmed renewal is recent enough that nobody can have taken the lease over."""
        return time.monotonic() - self._renewed < self.ttl - self.ttl / 4

    def acquire(self) -> None:
        try:
            holder = self.holder()
        except OSError as e:
            raise BatchLLMError(f"cannot read the lease of {self.storage.location}: {e}") from None
        if holder is not None and holder.get("token") != self.token and not self.expired(holder):
            raise self._busy(holder)
        self._acquired_at = time.time()
        self._write()
        if self.settle > 0:
            time.sleep(self.settle)
        try:
            holder = self.holder()
        except OSError as e:
            raise BatchLLMError(f"cannot read the lease of {self.storage.location}: {e}") from None
        if holder is None or holder.get("token") != self.token:  # another acquirer's write landed after ours
            raise self._busy(holder or {})
        self._held = True
        self._thread = threading.Thread(target=self._renew_loop, name="batchllm-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                holder = self.holder()
                if holder is None or holder.get("token") != self.token:
                    self._lost = "its lease was taken over" if holder else "its lease was deleted"
                    return
                if not self._fresh():  # stalled (or failing) too long: another run may hold it now
                    self._lost = "it could not renew its lease in time"
                    return
                self._write()
            except Exception:  # noqa: BLE001  (a blip: retried next tick; _fresh() bounds how long)
                if not self._fresh():
                    self._lost = "it could not renew its lease in time"
                    return

    def holds(self) -> bool:
        """Whether this process still holds the folder, as far as it knows without reading the store."""
        return self._held and self._lost is None and self._fresh()

    def check(self) -> None:
        """Before a manifest write: raise BatchLLMError when this process no longer holds the lease
        (taken over after a stall longer than ``ttl``, or deleted), so two writers never interleave."""
        if not self._held:
            return
        if self._lost is None and not self._fresh():
            self._lost = "it could not renew its lease in time"
        if self._lost is None:
            try:
                holder = self.holder()
            except OSError:  # unreadable now, but renewed recently enough that nobody can have taken it
                holder = {"token": self.token}
            if holder is None or holder.get("token") != self.token:
                self._lost = "its lease was taken over" if holder else "its lease was deleted"
        if self._lost:
            raise BatchLLMError(f"this process no longer holds {self.storage.location}: {self._lost} "
                                "(another process may be writing the job); stopping without writing the manifest")

    def release(self) -> None:
        """Stop renewing and delete the lease object if it is still this process's."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        if self._held:
            self._held = False
            try:
                holder = self.holder()
            except OSError:
                return  # left to expire
            if holder is not None and holder.get("token") == self.token:
                self.storage.remove(LOCK)
