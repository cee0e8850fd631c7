"""Names that come from files (classes, datasets, cases, modalities) are data, never paths.

A class name read from a checkpoint or ``dataset.json`` ends up in an output file name
(``CASE_prob_<class>.nii.gz``) and a dataset name in the slice-cache folder: a name such as
``x/../../labelsTr/case001`` would write outside the output folder. Every such name is therefore checked once,
where it is read (:func:`check_name`), and every output path built from one is checked again
(:func:`child_path`) so that it cannot resolve outside its folder.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from modalseg.errors import ModalsegError, OutputError

#: Longest name accepted, in UTF-8 bytes. File systems allow 255 bytes per file name; a case id must leave room
#: for what predict appends (``_prob_<class>`` and an extension), a class or modality name is far shorter.
#: Bidirectional overrides and line separators: not control characters to Unicode, but they make a name display as
#: another one.
_INVISIBLE = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")
MAX_NAME_BYTES = {"case id": 200, "dataset name": 128, "class name": 64, "modality name": 64}


def name_problem(name: object, what: str = "name") -> str | None:
    """Why ``name`` is not a safe single file-name component, or ``None`` if it is."""
    if not isinstance(name, str):
        return f"{what} must be a string, found {type(name).__name__}"
    if not name or not name.strip():
        return f"{what} is empty"
    if name in (".", "..") or ".." in name:
        return f"{what} {name!r} contains '..'"
    for ch in name:
        if ch in "/\\":
            return f"{what} {name!r} contains a path separator {ch!r}"
        if unicodedata.category(ch) == "Cc" or ch in _INVISIBLE:
            return f"{what} {name!r} contains a control character {ch!r}"
    if name != name.strip():
        return f"{what} {name!r} has leading or trailing spaces"
    limit = MAX_NAME_BYTES.get(what, 128)
    if len(name.encode("utf-8")) > limit:
        return f"{what} {name[:40]!r}... is longer than {limit} bytes"
    return None


def check_name(name: object, what: str, source: str | Path | None, error: type[ModalsegError]) -> str:
    """Return ``name`` if it is a safe file-name component, else raise ``error`` naming ``source``."""
    problem = name_problem(name, what)
    if problem is not None:
        raise error(f"refused: {problem} (names are used in file names: no '/', '\\', '..' or control characters)",
                    source)
    return str(name)


def check_names(names: Iterable[object], what: str, source: str | Path | None, error: type[ModalsegError]) -> None:
    for name in names:
        check_name(name, what, source, error)


def child_path(folder: str | Path, name: str) -> Path:
    """``folder / name``, refused unless it is a direct child of ``folder`` (after resolving links)."""
    folder = Path(folder)
    target = folder / name
    if os.sep in name or (os.altsep and os.altsep in name) or name in ("", ".", ".."):
        raise OutputError(f"refused to write {name!r}: not a plain file name", folder)
    base = folder.resolve()
    if target.resolve().parent != base:
        raise OutputError(f"refused to write {name!r}: it would resolve outside the folder", folder)
    if len(os.fsencode(name)) > 255:
        raise OutputError(f"refused to write {name[:40]!r}...: file name longer than 255 bytes", folder)
    return target
