"""The HDF5 safety machinery of run files: the writer lock, fencing a file after a write error,
the superblock read by hand, and recovery of a file left by a killed writer.

- A POSIX byte-range lock (``lockf``, independent of HDF5's ``flock``) marks a live writer, so
  a second writer (or a recovery) of the same file refuses instead of working under the first.
- After a failed write the file is fenced: HDF5's descriptor of it is pointed at an anonymous
  in-memory file (``memfd``), so that no later byte from HDF5 (the dirty metadata it flushes
  when the file is closed, possibly half of it) reaches the run file, while the close itself
  succeeds. (HDF5 2.0 / h5py 3.16: pointed at /dev/null instead, the close fails, and freeing
  any h5py object of that file afterwards crashes the process; measured.)
- A SWMR writer that was killed leaves the superblock flag "open for SWMR writing" set, and
  may leave rows past the commit counter; plain HDF5 readers refuse such a file.
  :func:`recover` copies its committed content into a fresh file and renames that over it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import InputError
from .schema import DIMENSION_SCALE_ATTRIBUTES, attach_dimensions, is_dimension_only

#: Rows of a growing dataset are copied in blocks of about this many bytes (also the chunk
#: budget of the writer).
CHUNK_BYTES = 2 * 1024 * 1024
#: File format of SWMR run files: 1.10 is the oldest that has SWMR, and Debian 12's h5dump
#: (HDF5 1.10.8) cannot read the attributes HDF5 2.0 writes with "latest" (measured).
SWMR_LIBVER = ("v110", "v110")
#: Byte offset of the writer lock: far beyond any real file size, so it covers no data.
LOCK_OFFSET = 1 << 62
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Where HDF5 looks for the superblock (file format specification: 0, then powers of two from 512).
SUPERBLOCK_OFFSETS = (0, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def reason(err: Exception) -> str:
    """The useful part of an OSError from the OS or from HDF5, on one line."""
    if getattr(err, "errno", None) and getattr(err, "strerror", None):
        return err.strerror
    text = " ".join(str(err).split())
    for code, name in ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded"),
                       (errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")):
        if name in text or f"errno = {code}," in text:
            return name
    return text


# -- the writer lock --------------------------------------------------------------------------------
class WriterLock:
    """An exclusive ``lockf`` on one byte far past the end of the file: held by the process
    writing the file, released by the kernel when that process ends (also by SIGKILL)."""

    def __init__(self, path: str):
        try:
            self.fd = os.open(path, os.O_RDWR)
        except OSError as err:
            raise InputError(f"{path} cannot be opened for writing: {err.strerror}") from None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, LOCK_OFFSET)
        except OSError as err:
            os.close(self.fd)
            self.fd = None
            if err.errno in (errno.EACCES, errno.EAGAIN):
                raise InputError(f"{path} is being written by another running ddln process; "
                                 f"stop it first (or wait for it to finish)") from None
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # a file system without POSIX locks: carry on unprotected

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def check_not_being_written(path: str | Path) -> None:
    """Raise InputError if another process holds the writer lock of ``path``."""
    if Path(path).is_file():
        WriterLock(str(path)).release()


# -- fencing ----------------------------------------------------------------------------------------
def fence(f: h5py.File) -> None:
    """Point HDF5's descriptor of the file at an anonymous file, so that nothing HDF5 writes from
    now on (e.g. dirty metadata flushed on close) reaches the run file; closing ``f`` then
    succeeds. The committed content on disk stays as it is."""
    try:
        fd = f.id.get_vfd_handle()
        sink = os.memfd_create("ddln-fenced") if hasattr(os, "memfd_create") else _anonymous_file()
    except Exception:  # noqa: BLE001 - best effort: the commit counter protocol still holds
        return
    os.dup2(sink, fd)
    os.close(sink)


def _anonymous_file() -> int:
    """A read-write descriptor of an unlinked temporary file (where memfd does not exist)."""
    handle, name = tempfile.mkstemp(prefix="ddln-fenced-")
    os.unlink(name)
    return handle


def close_quietly(f: h5py.File) -> None:
    """Close ``f`` if it is open; after a write error the close may fail too, which is ignored
    (the file was fenced)."""
    try:
        if f.id.valid:
            f.close()
    except Exception:  # noqa: BLE001 - see above
        pass


# -- the superblock ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Superblock:
    """The fields of an HDF5 superblock this package reads (file format specification, section
    II.A): its version, the SWMR-writer flag, and the end-of-file address it records."""

    version: int
    swmr_writing: bool
    base_address: int
    end_of_file: int | None


def read_superblock(path: str | Path) -> Superblock | None:
    """The superblock of an HDF5 file, or None if it is not one (or cannot be read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(SUPERBLOCK_OFFSETS[-1] + 128)
    except OSError:
        return None
    base = next((k for k in SUPERBLOCK_OFFSETS if head[k:k + 8] == HDF5_SIGNATURE), None)
    if base is None or len(head) < base + 9:
        return None
    sb = head[base:]
    version = sb[8]
    if version in (0, 1):
        # version, free-space, root-group, reserved, shared-header versions, offset size at 13
        offsets = sb[13] if len(sb) > 13 else 0
        start = 24 + (4 if version == 1 else 0)  # then base, free-space, end-of-file addresses
        flags = 0
    elif version in (2, 3):
        offsets = sb[9] if len(sb) > 9 else 0
        start = 12  # then base, extension, end-of-file addresses
        flags = sb[11] if len(sb) > 11 else 0
    else:
        return Superblock(version, False, 0, None)
    eof_at = start + 2 * offsets
    if offsets not in (2, 4, 8) or len(sb) < eof_at + offsets:
        return Superblock(version, bool(flags & 0x04), 0, None)
    base_address = int.from_bytes(sb[start:start + offsets], "little")
    end = int.from_bytes(sb[eof_at:eof_at + offsets], "little")
    # file consistency flags (versions 2, 3): bit 2 is "SWMR write access"
    return Superblock(version, bool(flags & 0x04), base_address, end)


def swmr_writer_flag(path: str | Path) -> bool:
    """Whether the superblock says a SWMR writer has the file open (or had, and was killed)."""
    sb = read_superblock(path)
    return sb is not None and sb.swmr_writing


def check_not_truncated(path: str | Path) -> None:
    """InputError when the file is shorter than the end-of-file address its superblock records
    (an incomplete copy): HDF5 itself can spin for minutes retrying such a file's metadata
    under SWMR."""
    path = Path(path)
    if not path.is_file():
        return  # the readers name the problem
    sb = read_superblock(path)
    if sb is None or sb.end_of_file is None:
        return
    size = path.stat().st_size
    if sb.base_address + sb.end_of_file > size:
        raise InputError(f"run file {path} is truncated: {size} bytes, its HDF5 superblock says "
                         f"{sb.base_address + sb.end_of_file} bytes")


# -- recovery ---------------------------------------------------------------------------------------
def committed_count(counter: h5py.Dataset) -> int:
    """The value of the commit counter ``/checkpoints/committed``."""
    return int(np.asarray(counter[()]).reshape(-1)[0])


def recovery_needed(path: str | Path) -> str | None:
    """Why a run file no writer holds needs :func:`recover` (None: it does not): its superblock
    still says a writer has it open (a killed SWMR writer: plain HDF5 readers refuse it), or its
    checkpoint datasets hold rows past the commit counter (a writer killed mid-checkpoint)."""
    if swmr_writer_flag(path):
        return "a writer was killed while it had the file open"
    try:
        with h5py.File(path, "r") as f:
            committed = committed_count(f["checkpoints/committed"])
            longest = max((ds.shape[0] for name, ds in f["checkpoints"].items() if name != "committed"),
                          default=committed)
    except (OSError, KeyError, ValueError):
        return None  # not a readable run file: the readers name the problem
    if longest > committed:
        return f"{longest - committed} uncommitted rows after the last committed checkpoint"
    return None


def recover(path: str | Path) -> str | None:
    """Make a crashed run file open in any HDF5 reader (h5py's defaults, h5dump, xarray): copy its
    committed content into a fresh file that replaces it. Returns what was wrong (None: nothing,
    the file is left alone). Refuses (InputError) a file that a running ddln process writes."""
    path = str(path)
    lock = WriterLock(path)
    try:
        Path(f"{path}.rebuild").unlink(missing_ok=True)  # left by a recovery that was killed
        why = recovery_needed(path)
        if why is not None:
            rebuild(path)
        return why
    finally:
        lock.release()


def recover_for_reading(path: str | Path) -> str | None:
    """:func:`recover` for the read-only commands: a file that a running writer holds, that
    cannot be written here, or that is not a run file is left as it is (read through SWMR, or
    refused by the reader with its own message). Returns what was recovered, or None."""
    if not Path(path).is_file():
        return None
    try:
        return recover(path)
    except (InputError, OSError):
        return None


def rebuild(path: str, change=None) -> None:
    """Copy the committed content of a run file into a new file and rename it over the original
    (a kill during the copy leaves the original untouched). The copy is closed cleanly, so it
    carries no "open for writing" flag, and its checkpoint datasets end at the commit counter.
    ``change(copy)``, if given, edits the open copy before the rename (a new file is not in SWMR
    mode, so attributes may be added there). The caller holds the writer lock."""
    tmp = f"{path}.rebuild"
    kwargs = {"swmr": True, "libver": "latest"} if swmr_writer_flag(path) else {}
    try:
        src = h5py.File(path, "r", **kwargs)
    except OSError as err:
        raise InputError(f"run file {path} cannot be opened to recover it ({reason(err)})") from None
    # the same format as the original: a file of a run without SWMR stays in the oldest
    # format, whose superblock has no "open for writing" flag that a killed writer leaves set
    sb = read_superblock(path)
    libver = SWMR_LIBVER if sb is not None and sb.version >= 2 else "earliest"
    with src, h5py.File(tmp, "w", libver=libver, track_order=True) as dst:
        copy_attributes(src, dst)
        committed = committed_count(src["checkpoints/committed"])
        for name, obj in src.items():
            if isinstance(obj, h5py.Group):
                # the checkpoint rows up to the counter only, read row range by row range: a
                # killed writer may have left the index of uncommitted chunks half-written, and
                # a SWMR reader retries such metadata for minutes, so nothing past the commit
                # counter is touched (H5Ocopy would touch it)
                copy_group(obj, dst, committed if name == "checkpoints" else None)
            elif not is_dimension_only(obj):
                copy_dataset(obj, dst, name)
        attach_dimensions(dst)
        if change is not None:
            change(dst)
        dst.flush()
    os.replace(tmp, path)


def copy_attributes(src, dst) -> None:
    """The attributes of ``src`` onto ``dst``, except the dimension-scale machinery (object
    references into the source file; :func:`attach_dimensions` makes them anew)."""
    for key, value in src.attrs.items():
        if key not in DIMENSION_SCALE_ATTRIBUTES:
            dst.attrs[key] = value


def copy_group(src: h5py.Group, parent: h5py.Group, rows: int | None) -> None:
    """A copy of the group ``src`` into ``parent`` (recursively); with ``rows``, datasets that
    grow along their first axis keep only their first ``rows`` rows."""
    name = src.name.rsplit("/", 1)[-1]
    out = parent.create_group(name, track_order=True)
    copy_attributes(src, out)
    for key, obj in src.items():
        if isinstance(obj, h5py.Group):
            copy_group(obj, out, rows)
        else:
            grows = rows is not None and obj.maxshape and obj.maxshape[0] is None
            copy_dataset(obj, out, key, rows if grows else None)


def copy_dataset(ds: h5py.Dataset, group: h5py.Group, name: str, rows: int | None = None) -> None:
    """A copy of ``ds`` (its first ``rows`` rows if given) into ``group`` (same dtype, chunks,
    growth and attributes), in blocks of about CHUNK_BYTES."""
    shape = ds.shape if rows is None else (rows, *ds.shape[1:])
    out = group.create_dataset(name, shape=shape, maxshape=ds.maxshape, chunks=ds.chunks, dtype=ds.dtype)
    copy_attributes(ds, out)
    if ds.ndim == 0:
        out[()] = ds[()]
        return
    if ds.chunks is None and ds.id.get_storage_size() == 0:
        return  # never written (e.g. a state array that referred to a checkpoint row)
    row_bytes = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    block = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, shape[0], block):
        stop = min(shape[0], start + block)
        out[start:stop] = ds[start:stop]
