"""Pair directories and the one atomic writer of rtcnn's outputs.

A pair directory is what every pair source writes (:mod:`rtcnn.sim`,
:mod:`rtcnn.io.openuniverse`, :mod:`rtcnn.io.asdf`) and what every reader finds (the
DataModules, ``detect``, ``baseline``, ``score``)::

    DIR/<pair>/ref.fits      reference image (FITS, primary HDU or SCI)
    DIR/<pair>/new.fits      new image on the same pixel grid
    DIR/<pair>/truth.ecsv    objects whose flux changed (or truth.fits / truth.csv)
    DIR/<pair>/sources.ecsv  every object (optional)
    DIR/<pair>/params.json   provenance (optional)

:func:`find_pairs` finds them, :func:`write_pair` writes one (all files or none), and
:func:`output_name` turns a pair name into the stem of its per-pair outputs.

Writing
-------
:func:`atomic_write` is the only way rtcnn puts a file on disk under its final name
(catalogs, region files, JSON, plots, images, checkpoints). The content goes to a
temporary file in the destination's folder, is flushed to disk, then

* without ``overwrite``: hard-linked to the final name, which fails if any other writer
  created that name in the meantime (two processes writing one ``-o``: exactly one
  wins, the other gets a one-line error);
* with ``overwrite``: renamed over it (:func:`os.replace`).

Readers see nothing, the old file or the complete new one. A new file gets the mode
``0666 & ~umask``; a replaced file keeps its mode. Directories, device nodes, FIFOs and
sockets are never replaced, and an output is never one of the command's inputs.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtcnn.errors import RtcnnInputError

#: File names of a pair directory.
REF_NAME = "ref.fits"
NEW_NAME = "new.fits"
TRUTH_NAME = "truth.ecsv"
SOURCES_NAME = "sources.ecsv"
PARAMS_NAME = "params.json"
#: Every file the simulator writes in a pair directory, in this order.
PAIR_FILES = (REF_NAME, NEW_NAME, TRUTH_NAME, SOURCES_NAME, PARAMS_NAME)
#: Truth catalog names looked for in a pair directory, first found wins.
TRUTH_NAMES = (TRUTH_NAME, "truth.fits", "truth.csv")
#: Name of the simulator's pair ``i`` inside its output directory.
PAIR_FORMAT = "pair_{:04d}"
#: Separator that replaces ``/`` of a nested pair name in the name of its outputs.
OUTPUT_SEPARATOR = "_"

_TMP_SUFFIX = ".tmp"
_UMASK_LOCK = threading.Lock()


@dataclass(frozen=True)
class PairFiles:
    """Paths of one image pair. ``ref``/``new`` may not exist (reading them then says so)."""

    ref: Path
    new: Path
    truth: Path | None
    name: str


# --------------------------------------------------------------------------- layout
def pair_dir(outdir: str | os.PathLike, index: int) -> Path:
    """``OUTDIR/pair_XXXX``: the directory of the simulator's pair ``index``."""
    return Path(outdir) / PAIR_FORMAT.format(index)


def output_name(pair_name: str) -> str:
    """Stem of a pair's outputs in a flat output directory: ``a/b/c`` → ``a_b_c``.

    Two nested names can give the same stem (``x/a_b`` and ``x_a/b``); callers writing
    several pairs must check that the stems are distinct (:func:`rtcnn.cli.pair_jobs`).
    """
    return pair_name.replace("/", OUTPUT_SEPARATOR)


def find_pairs(root: str | os.PathLike, ref_name: str = REF_NAME, new_name: str = NEW_NAME,
               truth_names: tuple[str, ...] = TRUTH_NAMES) -> list[PairFiles]:
    """Find image pairs under a directory, in one pair directory, or from a glob.

    A pair directory holds ``ref_name`` and/or ``new_name`` (one missing still yields a
    pair, so that reading it names the missing file) and optionally a truth catalog
    (first of ``truth_names`` present). A directory that is not itself a pair directory
    is searched recursively. A glob (``*``, ``?``, ``[``) may match pair directories or
    files inside them.

    Returns
    -------
    list of PairFiles
        Sorted by path; ``name`` is the directory name (or the path relative to the
        common parent when names repeat).

    Raises
    ------
    RtcnnInputError
        ``root`` does not exist, or no pair is found.
    """
    text = os.fspath(root)
    if any(c in text for c in "*?["):
        matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
        dirs = {m if m.is_dir() else m.parent for m in matches}
        dirs = {d for d in dirs if _is_pair_dir(d, ref_name, new_name)}
    else:
        base = Path(text)
        if not base.exists():
            raise RtcnnInputError(base, "no such file or directory")
        if not base.is_dir():
            raise RtcnnInputError(base, "is a file; give a directory of pairs or a glob")
        if _is_pair_dir(base, ref_name, new_name):
            dirs = {base}
        else:
            dirs = {f.parent for name in (ref_name, new_name) for f in base.rglob(name)}
    if not dirs:
        raise RtcnnInputError(
            text, f"no image pairs found (expected {ref_name} and {new_name} in this "
            "directory or in its subdirectories)"
        )
    ordered = sorted(dirs, key=lambda d: str(d))
    names = [d.name for d in ordered]
    if len(set(names)) != len(names):
        common = Path(os.path.commonpath([str(d.resolve()) for d in ordered]))
        names = [d.resolve().relative_to(common).as_posix() for d in ordered]
    pairs = []
    for d, name in zip(ordered, names):
        truth = next((d / t for t in truth_names if (d / t).is_file()), None)
        pairs.append(PairFiles(d / ref_name, d / new_name, truth, name))
    return pairs


def _is_pair_dir(d: Path, ref_name: str, new_name: str) -> bool:
    return d.is_dir() and ((d / ref_name).exists() or (d / new_name).exists())


def is_complete(directory: str | os.PathLike,
                names: Iterable[str] = (REF_NAME, NEW_NAME, TRUTH_NAME)) -> bool:
    """True when ``directory`` holds every file of ``names`` (a pair written in full)."""
    d = Path(directory)
    return all((d / n).is_file() for n in names)


def read_params(directory: str | os.PathLike) -> dict | None:
    """The pair's ``params.json`` as a dict, or None when missing or unreadable."""
    try:
        out = json.loads((Path(directory) / PARAMS_NAME).read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


# --------------------------------------------------------------------------- writing
def file_writer(name: str, obj: Any) -> Callable[[str], None]:
    """How a pair file is written, from its name: ``writer(path)``.

    ``.fits``: an :class:`astropy.io.fits.HDUList` / HDU (``writeto``, verified);
    ``.ecsv``: an astropy Table; ``.json``: a JSON-serialisable dict (sorted keys).
    """
    if name.endswith(".fits"):
        return lambda path: obj.writeto(path, output_verify="exception")
    if name.endswith(".ecsv"):
        return lambda path: obj.write(path, format="ascii.ecsv")
    if name.endswith(".json"):
        text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
        return lambda path: Path(path).write_text(text)
    raise ValueError(f"no writer for pair file {name!r} (.fits, .ecsv or .json)")


def write_pair(directory: str | os.PathLike, files: Mapping[str, Any],
               overwrite: bool = False) -> Path:
    """Write the files of one pair directory, all or nothing.

    A new pair is written into a temporary sibling directory that is then renamed to
    ``directory``, so a crash leaves no partial pair under the final name. An existing
    pair (``overwrite``) has each file replaced atomically (:func:`atomic_write`); files
    not in ``files`` stay.

    Parameters
    ----------
    directory : path-like
        The pair directory; its parent is created if missing.
    files : mapping
        File name → content (see :func:`file_writer`).
    overwrite : bool
        Replace an existing pair's files; otherwise an existing directory is an error.

    Returns
    -------
    pathlib.Path
        ``directory``.
    """
    final = Path(directory)
    if final.exists():
        if not overwrite:
            raise RtcnnInputError(final, "pair already exists; pass --overwrite to replace it")
        if not final.is_dir():
            raise RtcnnInputError(final, "exists and is not a directory")
        for name, obj in files.items():
            atomic_write(final / name, True, file_writer(name, obj))
        return final
    make_output_dir(final.parent)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=_TMP_SUFFIX,
                                   dir=final.parent))
    try:
        tmpdir.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700
        for name, obj in files.items():
            file_writer(name, obj)(str(tmpdir / name))
        _fsync_files(tmpdir / name for name in files)
        try:
            os.rename(tmpdir, final)
        except OSError as err:  # another writer made the pair meanwhile
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise RtcnnInputError(final, "pair already exists; pass --overwrite to "
                                      "replace it") from None
            raise
    finally:
        if tmpdir.exists():
            shutil.rmtree(tmpdir)
    return final


def current_umask() -> int:
    """The process's file-creation mask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def check_output(path: str | os.PathLike, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike] = (), probe: bool = False) -> Path:
    """Refuse, as one :class:`RtcnnInputError` line, an output that cannot or must not be written.

    Checked before any work: ``path`` is one of ``inputs`` (the same file, by inode), a
    directory, an existing file without ``overwrite``, an existing non-regular file
    (device, FIFO, socket), or its folder is missing or not a folder. With ``probe``,
    a temporary file is created and removed in the folder, which catches read-only
    and virtual file systems (``/proc``) and missing permissions.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    p = Path(path)
    for inp in inputs:
        if _same_file(p, Path(inp)):
            raise RtcnnInputError(p, f"is an input of this command ({inp}); an output never "
                                  "replaces an input")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise RtcnnInputError(p, f"{_first_file_parent(p)} is a file, not a directory"
                              ) from None
    except OSError as err:
        raise RtcnnInputError(p, f"cannot be checked ({err.strerror or err})") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise RtcnnInputError(p, "is a directory; give a file name")
        if not overwrite:
            raise RtcnnInputError(p, "already exists; pass --overwrite to replace it")
        if not stat.S_ISREG(st.st_mode):
            raise RtcnnInputError(p, "is not a regular file (a device, FIFO or socket); "
                                  "refusing to replace it")
    parent = _parent(p)
    if not parent.exists():
        raise RtcnnInputError(p, f"output directory {parent} does not exist")
    if not parent.is_dir():
        raise RtcnnInputError(p, f"{parent} is a file, not a directory")
    if probe:
        _probe_dir(parent, p)
    return p


def check_output_dir(path: str | os.PathLike) -> Path:
    """Refuse an output directory that cannot be created or written, creating nothing.

    The directory itself or its nearest existing ancestor must be a writable directory
    (probed with a temporary file).
    """
    p = Path(path)
    probe_at = p
    while not probe_at.exists():
        if probe_at.parent == probe_at:
            break
        probe_at = probe_at.parent
    if probe_at.exists() and not probe_at.is_dir():
        where = "is a file" if probe_at == p else f"cannot be created: {probe_at} is a file"
        raise RtcnnInputError(p, f"{where}; several pairs need an output directory")
    _probe_dir(probe_at, p)
    return p


def make_output_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p path`` with a one-line :class:`RtcnnInputError` on failure."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent is a file, no permission, read-only file system
        raise RtcnnInputError(p, f"cannot create the output directory ({err.strerror or err})"
                              ) from None
    return p


def atomic_write(path: str | os.PathLike, overwrite: bool, writer: Callable[[str], Any],
                 inputs: Iterable[str | os.PathLike] = (), fsync: bool = True) -> Path:
    """Write ``path`` atomically; ``writer(tmp)`` writes the content to the file name ``tmp``.

    See the module docstring. ``tmp`` is a fresh name in ``path``'s folder (the file does
    not exist yet).

    Parameters
    ----------
    path : path-like
        Destination; its folder must exist.
    overwrite : bool
        Replace an existing regular file; otherwise an existing ``path`` -- also one that
        another writer creates while this one runs -- is an error.
    writer : callable
        ``writer(tmp: str)``.
    inputs : iterable of path-like
        Files ``path`` must not be (the command's inputs).
    fsync : bool
        Flush the file to disk before it takes the final name (a power cut then leaves
        the old file or the new one). About 9 ms a file on a cloud disk: callers writing
        many small files that can be made again (alert cutouts) may skip it; the rename
        stays atomic for other processes either way.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    RtcnnInputError
        Any refusal of :func:`check_output`, ``path`` created by someone else meanwhile
        (without ``overwrite``), or the file system refusing the write.
    """
    p = check_output(path, overwrite, inputs)
    parent = _parent(p)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=_TMP_SUFFIX, dir=parent)
    except OSError as err:
        raise RtcnnInputError(p, f"cannot be written ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(tmp)  # the writer creates it (some writers refuse an existing file)
    try:
        writer(tmp)
        if fsync:
            _fsync_files([Path(tmp)])
        _commit(tmp, p, overwrite)
    except OSError as err:
        raise RtcnnInputError(p, f"cannot be written ({err.strerror or err})") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return p


# --------------------------------------------------------------------------- helpers
def _commit(tmp: str, p: Path, overwrite: bool) -> None:
    """Put the finished ``tmp`` under the name ``p`` with the right mode."""
    if overwrite:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise RtcnnInputError(p, "is not a regular file (a device, FIFO or socket); "
                                  "refusing to replace it")
        os.chmod(tmp, stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~current_umask())
        os.replace(tmp, p)
        return
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        os.link(tmp, p)  # atomic: fails when the name exists, whoever made it
    except FileExistsError:
        raise RtcnnInputError(p, "already exists; pass --overwrite to replace it") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                             errno.EMLINK, errno.ENOSYS):
            raise
        # no hard links on this file system: claim the name exclusively, then rename
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise RtcnnInputError(p, "already exists; pass --overwrite to replace it"
                                  ) from None
        os.replace(tmp, p)


def _fsync_files(paths: Iterable[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _parent(p: Path) -> Path:
    return p.parent if str(p.parent) else Path(".")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _first_file_parent(p: Path) -> Path:
    """The first ancestor of ``p`` that exists and is not a directory."""
    for parent in reversed(p.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return _parent(p)


def _probe_dir(folder: Path, target: Path) -> None:
    """Create and remove a temporary file in ``folder``; a one-line error if that fails."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".rtcnn-probe.", suffix=_TMP_SUFFIX, dir=folder)
    except OSError as err:
        raise RtcnnInputError(target, f"cannot be written ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(tmp)


__all__ = [
    "NEW_NAME",
    "OUTPUT_SEPARATOR",
    "PAIR_FILES",
    "PAIR_FORMAT",
    "PARAMS_NAME",
    "PairFiles",
    "REF_NAME",
    "SOURCES_NAME",
    "TRUTH_NAME",
    "TRUTH_NAMES",
    "atomic_write",
    "check_output",
    "check_output_dir",
    "current_umask",
    "file_writer",
    "find_pairs",
    "is_complete",
    "make_output_dir",
    "output_name",
    "pair_dir",
    "read_params",
    "write_pair",
]
