"""Replacing a folder of generated data files without losing what was there.

New files are written into a temporary sibling of the output folder, which is then swapped in with one rename
(Linux `renameat2(RENAME_EXCHANGE)` when the folder exists; elsewhere two renames, undone on failure): a crash
while writing leaves the old folder untouched. Before that, `check_replaceable` refuses to replace a parquet
output by one with fewer rows (unless asked) and refuses a folder holding files the writer does not own.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class OutputError(RuntimeError):
    """An output folder that cannot be replaced as asked (nothing was changed)."""


def check_replaceable(out: Path, owned: Collection[str], new_rows: Mapping[str, int], allow_fewer: bool,
                      how_to_allow: str = "allow fewer rows") -> None:
    """Raises OutputError when `out` is not a folder, holds entries outside `owned`, or (unless `allow_fewer`) holds
    a parquet file named in `new_rows` with more rows than its replacement would have. `how_to_allow` ends those
    messages (e.g. the flag to pass)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in owned)
    if foreign:
        raise OutputError(f"{out} holds entries this run does not write ({', '.join(foreign[:10])}); the folder is "
                          "replaced as a whole, so choose an empty or new one")
    if allow_fewer:
        return
    for name, rows in new_rows.items():
        old = out / name
        if not old.exists():
            continue
        try:
            old_rows = pq.read_metadata(old).num_rows
        except (OSError, pa.ArrowException) as err:
            raise OutputError(f"{old} cannot be read ({err}), so it is not known whether the new file has fewer "
                              f"rows; {how_to_allow} to replace it anyway") from err
        if rows < old_rows:
            raise OutputError(f"{old} has {old_rows} rows and would be replaced by {rows}; {how_to_allow} to "
                              "replace it anyway")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two existing paths (Linux renameat2); False when this system or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported by this kernel or filesystem
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _swap_in(staged: Path, out: Path) -> None:
    """Puts `staged` at `out`; the old `out` (if any) ends at `staged`'s path, for the caller to delete."""
    if not out.exists():
        staged.rename(out)
        return
    if _exchange(staged, out):
        return
    backup = staged.with_name(staged.name + ".old")
    out.rename(backup)
    try:
        staged.rename(out)
    except OSError:
        backup.rename(out)
        raise
    backup.rename(staged)


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yields an empty temporary folder next to `out`; when the block ends without error the folder replaces `out`
    (whose old content is then deleted), otherwise it is deleted and `out` is left as it was."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        mode = out.stat().st_mode if out.is_dir() else 0o777 & ~_umask()
        os.chmod(staged, mode & 0o7777)
        yield staged
        _swap_in(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
