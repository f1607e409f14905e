"""Listing an input folder without ever failing on what it holds.

Every entry under the folder is either a file to read or a record with the reason it is not read:
links are resolved first, so a link loop, a dangling link, a link to a folder (never followed, so
never a loop) or to a file outside the folder, an unreadable folder, a FIFO or a file name that is
not UTF-8 is a record, not an exception and not a silent omission.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ctpipe.safepath import UnsafePath, inside


def display_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as text that can be written anywhere (undecodable bytes of a
    file name shown as ``\\xNN``)."""
    rel = os.fsencode(path.relative_to(root))
    return rel.decode("utf-8", errors="backslashreplace")


def list_files(root: Path) -> tuple[list[Path], list[dict]]:
    """Files under ``root`` to scan, and records for what cannot be scanned, each with its reason:
    symbolic links to folders (not followed, so no loop), dangling links, link loops, links to a
    file outside ``root``, FIFOs, sockets, devices, file names that are not UTF-8, folders and
    entries that cannot be read. A link to a regular file inside ``root`` is followed once. Never
    raises for what the folder holds. Files come in the order of their paths' components."""
    root = Path(root)
    files, skipped = [], []

    def skip(path: Path, reason: str) -> None:
        skipped.append({"path": display_path(path, root), "status": "skipped", "reason": reason})

    folders = [str(root)]
    below = len(os.path.join(folders[0], ""))  # an entry's path past the root (scandir joins so)
    while folders:  # paths as text: a Path per entry would cost more than the listing itself
        folder = folders.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as err:  # unreadable, or gone since its parent was listed
            skip(Path(folder), f"folder cannot be read: {strerror(err)}")
            continue
        for entry in entries:
            try:
                if entry.is_symlink():
                    reason = _link_problem(Path(entry.path), root)
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                    continue
                elif entry.is_file(follow_symlinks=False):
                    reason = ""
                else:
                    reason = "not a regular file (FIFO, socket or device)"
            except OSError as err:
                reason = f"cannot be read: {strerror(err)}"
            if not reason and not _utf8(entry.path[below:]):  # the root's own name may not be
                reason = "file name is not valid UTF-8"
            if reason:
                skip(Path(entry.path), reason)
            else:
                files.append(entry.path)
    files.sort(key=lambda path: path.split(os.sep))  # as Path orders them: part by part
    return [Path(path) for path in files], sorted(skipped, key=lambda rec: rec["path"])


def _utf8(path: str) -> bool:
    """Whether a path as the OS gave it was UTF-8 (undecodable bytes arrive as lone surrogates,
    which cannot be encoded)."""
    if path.isascii():
        return True
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def strerror(err: OSError) -> str:
    """The reason of an OS error without the path it names (the path is the record's own)."""
    return (err.strerror or type(err).__name__).lower()


def _link_problem(link: Path, root: Path) -> str:
    """Why the symbolic link ``link`` is not followed, or '' when it leads to a regular file inside
    ``root`` (links resolved)."""
    try:
        target = link.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop so
        return "symbolic link loop"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return "dangling symbolic link"
        return f"symbolic link cannot be followed: {strerror(err)}"
    if target.is_dir():
        return "symbolic link to a folder: not followed"
    try:
        inside(root, target)
    except UnsafePath:
        return "symbolic link to a file outside the input folder: not followed"
    return "" if target.is_file() else "not a regular file (FIFO, socket or device)"
