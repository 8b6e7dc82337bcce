"""Reading a directory someone else wrote (a bundle from the controller, an episode from a car) safely.

The rules the bundle reader and the episode reader share: a JSON file is read only up to a size limit and
parsed strictly (a duplicate key, a number too long to parse or nesting too deep is an error, not a crash);
a listed path must stay inside the directory and no part of it may be a symlink; and the tree holds only
directories and regular files, each listed (symlinks are never followed, so nothing outside is read).
Errors are `UnsafeFileError` with a message that starts with the caller's `where` ("bundle /x",
"episode 2026...-car1-000001"); `kind` names the directory's kind ("bundle", "episode"). Standard library
only: the car imports it too.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Collection
from pathlib import Path, PurePosixPath
from typing import Any


class UnsafeFileError(ValueError):
    """A file or tree that breaks the rules above; the message names it and the rule."""


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(key)
        obj[key] = value
    return obj


def parse_json(data: bytes, what: str) -> Any:
    """Parse `data` strictly; `what` names it in the error ("bundle /x: manifest.json")."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as exc:
        raise UnsafeFileError(f"{what} is not valid JSON: not UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise UnsafeFileError(f"{what} is not valid JSON: {exc}") from exc
    except _DuplicateKeyError as exc:
        raise UnsafeFileError(f"{what} has the key {exc.key!r} twice in one object") from exc
    except ValueError as exc:  # int() refuses integers longer than sys.get_int_max_str_digits()
        reason = str(exc).split(";")[0]  # not the advice to raise the interpreter's limit
        raise UnsafeFileError(f"{what} has a number too long to parse ({reason})") from exc
    except RecursionError as exc:
        raise UnsafeFileError(f"{what} is nested too deeply to parse") from exc


def read_json_file(root: Path, name: str, *, where: str, max_bytes: int, kind: str) -> Any:
    """`root / name` parsed strictly, refused when it is a symlink, missing or over `max_bytes`."""
    path = root / name
    if path.is_symlink():
        raise symlink_error(root, name, where=where, kind=kind)
    if not path.is_file():
        raise UnsafeFileError(f"{where}: {name} is missing")
    data = b""
    try:
        size = path.stat().st_size  # before reading: an oversized file is never read
        if size <= max_bytes:
            with path.open("rb") as stream:
                data = stream.read(max_bytes + 1)  # bounded even if the file grows meanwhile
            size = max(size, len(data))
    except OSError as exc:
        raise UnsafeFileError(f"{where}: {name} cannot be read: {exc}") from exc
    if size > max_bytes:
        raise UnsafeFileError(f"{where}: {name} is {size} bytes, more than the {max_bytes} allowed")
    return parse_json(data, f"{where}: {name}")


def symlink_error(root: Path, rel: str, *, where: str, kind: str) -> UnsafeFileError:
    """The error for a symlink at `root / rel`, saying where it points (and whether that is outside)."""
    path = root / rel
    try:
        target = str(path.readlink())
    except OSError:
        target = "?"
    try:
        outside = not path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        outside = False
    beyond = f", outside the {kind}" if outside else ""
    article = "an" if kind[:1] in "aeiou" else "a"
    return UnsafeFileError(
        f"{where}: {rel} is a symlink (to {target}{beyond}); {article} {kind} holds only regular files"
    )


def check_tree(root: Path, listed: Collection[str], *, where: str, kind: str, listing: str) -> None:
    """Refuse symlinks, non-regular files and files not in `listed` anywhere under `root` (links never
    followed); `listing` names what lists them ("the manifest")."""
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            children = sorted(directory.iterdir())
        except OSError as exc:
            raise UnsafeFileError(f"{where}: cannot list {directory}: {exc}") from exc
        for path in children:
            rel = path.relative_to(root).as_posix()
            try:
                mode = path.lstat().st_mode
            except OSError as exc:
                raise UnsafeFileError(f"{where}: {rel} cannot be read: {exc}") from exc
            if stat.S_ISLNK(mode):
                raise symlink_error(root, rel, where=where, kind=kind)
            if stat.S_ISDIR(mode):
                pending.append(path)
            elif not stat.S_ISREG(mode):
                raise UnsafeFileError(f"{where}: {rel} is not a regular file")
            elif rel not in listed:
                raise UnsafeFileError(f"{where}: {rel} is not listed in {listing}")


def listed_path(root: Path, rel: str, *, where: str, kind: str) -> Path:
    """`root / rel` after checking that it resolves inside `root` and that no part of it is a symlink."""
    path = root / rel
    try:
        resolved, real_root = path.resolve(), root.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise UnsafeFileError(f"{where}: {rel} cannot be resolved: {exc}") from exc
    if not resolved.is_relative_to(real_root):
        raise UnsafeFileError(f"{where}: {rel} resolves to {resolved}, outside the {kind}")
    parts = PurePosixPath(rel).parts
    for i in range(1, len(parts) + 1):
        part = PurePosixPath(*parts[:i]).as_posix()
        if (root / part).is_symlink():
            raise symlink_error(root, part, where=where, kind=kind)
    return path


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under `root` (symlinks are neither followed nor counted)."""
    total = 0
    for directory, _, files in os.walk(root):  # os.walk does not follow symlinked directories
        for file in files:
            mode = (Path(directory) / file).lstat()
            if stat.S_ISREG(mode.st_mode):
                total += mode.st_size
    return total
