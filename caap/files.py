"""Writing files so that a reader never sees half of one.

Every output of the toolkit (maps, plots, JSON summaries, caches) is written to a temporary name in its
own folder and renamed into place (`os.replace`, atomic on POSIX and Windows): a crash, a full disk or
Ctrl-C while writing leaves the previous file (or none), never a truncated one, and two writers of the
same file each leave a complete file behind. `atomic_paths` does the same for a group of files that
belong together (a PNG, an HTML view, a `.npy` and a JSON): they appear together, after all were
written.

Permissions: a file written here gets the mode a plain `open(path, "w")` would give it: that of the
file it replaces, else 0666 less the process's umask (0644 under the usual umask 022), not the 0600 of
the temporary file it was written as.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["atomic_path", "atomic_paths", "file_digest", "new_file_mode"]


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux: /proc), else by
    setting it and setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(path: str | os.PathLike) -> int:
    """The permission bits `path` gets when written: those of the file it replaces, else 0666 less the
    umask (what `open(path, "w")` gives a new file)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _temporary_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # same folder (so the rename stays on one file system), same suffix (writers pick formats by it)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Temporary paths for `paths`; when the block ends without an error they are renamed onto `paths`
    (all of them, in order: put the file that marks completion, e.g. a JSON summary, last); on an error
    they are removed and `paths` are left as they were."""
    finals = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for final in finals:
            temps.append(_temporary_beside(final))
        yield temps
        for tmp, final in zip(temps, finals):
            os.chmod(tmp, new_file_mode(final))  # mkstemp made it 0600
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path that becomes `path` when the block ends without an error (see `atomic_paths`)."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    """The first `length` hex digits of the SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]
