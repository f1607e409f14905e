"""Values from data never decide a path outside the folder they belong in.

A UID becomes a path component only through :func:`uid_component`, which checks the DICOM UID
grammar (PS3.5 9.1); every write, replace and delete below a root goes through :func:`inside`,
which resolves links first and refuses what lands outside the root.
"""

from __future__ import annotations

import re
from pathlib import Path

UID_MAX = 64
# Dot-separated numeric components, no leading zero except the component "0" itself.
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


class UnsafePath(ValueError):
    """A value that may not become a path (the message says why), or a path outside its root."""


def uid_reason(uid: object) -> str:
    """Why ``uid`` is not a valid DICOM UID, or '' when it is. The value itself is never quoted
    (a UID can be traced back to a patient)."""
    if not isinstance(uid, str):
        return f"a UID must be text, not {type(uid).__name__}"
    if not uid:
        return "empty UID"
    if len(uid) > UID_MAX:
        return f"UID of {len(uid)} characters (at most {UID_MAX})"
    if _UID.fullmatch(uid) is None:
        return "not a DICOM UID (digits in dot-separated components, no leading zero)"
    return ""


def uid_component(uid: object) -> str:
    """``uid`` as a path component, or :class:`UnsafePath` with the reason."""
    reason = uid_reason(uid)
    if reason:
        raise UnsafePath(reason)
    return str(uid)


def name_component(name: object) -> str:
    """``name`` (a file or folder name from params or data) as one path component, or
    :class:`UnsafePath` with the reason."""
    if not isinstance(name, str) or name in ("", ".", ".."):
        raise UnsafePath("not a file or folder name (empty, '.' or '..')")
    if "/" in name or "\x00" in name:
        raise UnsafePath("a name may not hold '/' or a NUL byte")
    return name


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` with links resolved, or :class:`UnsafePath` when that is not below ``root``
    (resolved too). The root itself does not count as inside."""
    if "\x00" in str(root) + str(path):
        raise UnsafePath("path with a NUL byte")
    try:
        base = Path(root).resolve()
        # relative paths: from the working folder, as open() reads them
        resolved = Path(path).resolve()
    except (RuntimeError, OSError) as err:  # a symbolic link loop (RuntimeError before 3.13)
        raise UnsafePath(f"{path} cannot be resolved: {err}") from None
    if resolved == base or base not in resolved.parents:
        raise UnsafePath(f"{path} is not inside {root}")
    return resolved
