"""Small file helpers: atomic writes and content hashes.

Every output goes through `atomic_output` so an interrupted run never leaves a half-written
file under its final name, and a rerun can trust any file it finds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the real suffix so writers that pick a format by extension (PyAV, PIL) still work
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def missing_folders(path: str | os.PathLike) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first: what making it creates."""
    out = []
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def holds_files(folder: str | os.PathLike, ignore: tuple[str, ...] = ()) -> bool:
    """Whether anything but folders (and the top-level names in `ignore`) is under `folder`."""
    top = Path(folder)
    return any(not p.is_dir() or p.is_symlink() for p in top.rglob("*") if not (p.parent == top and p.name in ignore))


def remove_empty_folders(folders: list[Path]) -> None:
    """rmdir each of `folders` (deepest first) while it is empty; a folder that is not is left, with its parents."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """Hash of a file, or of every file under a folder (names and contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def canonical_safetensors(path: str | os.PathLike) -> None:
    """Rewrite a .safetensors file's header with its keys sorted, so the same tensors and metadata
    always give the same bytes (the safetensors writer keeps metadata in a hash map, whose order
    changes from one process to the next). The tensor data is copied unchanged."""
    import shutil
    import struct

    path = Path(path)
    with open(path, "rb") as src:
        (n,) = struct.unpack("<Q", src.read(8))
        header = json.loads(src.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned, as the writer keeps it
        src.seek(8)
        if src.read(n) == text:
            return
        with atomic_output(path) as tmp, open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(text)))
            dst.write(text)
            shutil.copyfileobj(src, dst, 1 << 24)

