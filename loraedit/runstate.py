"""What each part of a run folder was made from, and one command per run folder at a time.

Every stage writes a record of its inputs (content hashes) and the settings it used:

    prepare/record.json    the user's files (video, first frame, references, masks) and the prepare
                           settings → hashes of what it wrote (frames, regions, references, first frame)
    train/record.json      what the LoRA learns from: the prepared frames, regions, references (and
                           the first frame where stage 2 uses its image embedding), the model, the
                           prompt, every training setting. Written before the first step, so a resume
                           is checked against it.
    cache/encoded-KEY.safetensors   keyed by the hash of everything encoded into it
    RENDER/settings.json   the render's settings, the LoRA's and first frame's hashes, the encoding

A rerun compares a stage's new record with the one on disk and then reuses the stage (equal),
redoes it where nothing trained is lost (a new render, a new encoding, new prepared frames before
any training), or refuses in one line naming what changed (a trained LoRA whose inputs changed:
use a new --out, or --restart to discard it explicitly). Nothing is reused silently.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from loraedit.errors import InputError
from loraedit.files import holds_files, missing_folders, read_json, remove_empty_folders, sha256_file

LOCK_NAME = ".lock"
ENCODING = "encoding"  # the key of the cache/encoded-KEY.safetensors a record was made from


# ---------------------------------------------------------------- content hashes


def sha256_bytes(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()


def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def array_hash(a) -> str:
    """Hash of a numpy array's shape, dtype and contents."""
    import numpy as np

    a = np.ascontiguousarray(a)
    return sha256_bytes(str(a.shape).encode(), str(a.dtype).encode(), a.tobytes())


def prepared_hashes(prepared: dict) -> dict:
    """Hashes of a prepared run's contents (as loaded by prepare.load): what later stages are made from."""
    plan = prepared["plan"]
    return {
        "frames": array_hash(prepared["source"]),
        "region": array_hash(prepared["region"]),
        "first_frame": array_hash(prepared["first"]),
        "refs": {str(k): array_hash(v) for k, v in sorted(prepared["refs"].items())},
        # the frame selection and size, and how the edit is conditioned (--mode auto decides in prepare)
        "geometry": {k: plan.get(k) for k in ("frames", "width", "height", "indices", "mode")},
    }


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf")


_FINGERPRINTS: dict[tuple, str] = {}  # (path, size, mtime) → fingerprint: one read per file per process


def weights_fingerprint(path: Path, samples: int = 16) -> str:
    """sha256 of a weight file's size, its first MiB (a safetensors header names every tensor with its
    shape and dtype) and `samples` 64-KiB pieces spread over the rest: another checkpoint of the same
    architecture (a fine-tune saved over the original, same size) differs in all of them, and a copy
    of the folder elsewhere does not. Reads about 2 MiB of a file of many GB."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns, samples)
    if memo in _FINGERPRINTS:
        return _FINGERPRINTS[memo]
    size = st.st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        for k in range(1, samples + 1):
            f.seek(size * k // (samples + 1))
            h.update(f.read(1 << 16))
    _FINGERPRINTS[memo] = h.hexdigest()
    return _FINGERPRINTS[memo]


def model_identity(model: str) -> dict:
    """What identifies a model folder without reading tens of GB: its configs' hashes, its transformer
    files' names and sizes, and a fingerprint of every weight file (transformer, VAE, encoders); a
    hub id stands for itself."""
    p = Path(model)
    if not p.is_dir():
        return {"id": model}
    configs = {str(c.relative_to(p)): sha256_file(c) for c in sorted(p.glob("*/*.json")) + [p / "model_index.json"] if c.is_file()}
    sizes = {str(w.relative_to(p)): w.stat().st_size for w in sorted(p.glob("transformer*/*.safetensors"))}
    weights = {str(w.relative_to(p)): weights_fingerprint(w) for w in sorted(p.glob("*/*"))
               if w.suffix in WEIGHT_SUFFIXES and w.is_file()}
    return {"configs": sha256_json(configs), "transformer_weights": sha256_json(sizes), "weights": sha256_json(weights)}


def model_as_recorded(now, recorded):
    """`now` (a model_identity) with only the parts that `recorded` holds: a run recorded before the
    weights were fingerprinted is compared on what it recorded (configs, transformer sizes), so an
    upgrade does not call every earlier run stale."""
    if isinstance(now, dict) and isinstance(recorded, dict) and "configs" in recorded:
        return {k: now[k] for k in recorded if k in now}
    return now


def file_hashes(paths: dict[str, str | None]) -> dict[str, str]:
    """sha256 of each named input file (a folder: of every file in it, names included)."""
    from loraedit.files import sha256_path

    return {name: sha256_path(p) for name, p in paths.items() if p and Path(p).exists()}


# ---------------------------------------------------------------- comparing records


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Names of the entries that differ between two records ('lr', 'inputs.region', …)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


def _shown(value) -> str:
    """A value as typed on the command line: quoted where it is empty or has spaces ('' → 'a man')."""
    if value is None:
        return "(none)"
    if isinstance(value, dict):  # --ref: frame=file ({} → (none); {'4': '/x/r4.png'} → 4=r4.png)
        return "+".join(f"{k}={Path(str(v)).name}" for k, v in value.items()) or "(none)"
    if isinstance(value, (list, tuple)):
        return "; ".join(_shown(v) for v in value) or "(none)"
    if isinstance(value, str) and (not value or any(c.isspace() for c in value)):
        return repr(value)
    if isinstance(value, str) and os.sep in value and len(value) > 40:
        return Path(value).name  # a path: its file name is what tells runs apart in one line
    return str(value)


def describe_changes(old: dict, new: dict) -> str:
    """'--lr 0.0001 → 0.0005, the edit region' for a one-line message."""
    parts = []
    settings_old, settings_new = old.get("settings", {}), new.get("settings", {})
    for k in differences(settings_old, settings_new):
        key = k.split(".")[0]
        a, b = settings_old.get(key), settings_new.get(key)
        shown = f"{_shown(a)} → {_shown(b)}" if len(_shown(a)) + len(_shown(b)) < 60 and _shown(a) != _shown(b) else "changed"
        parts.append(f"--{key.replace('_', '-')} {shown}")
    refs_given = any(p.startswith("--ref ") for p in parts)
    names = {"frames": "the source frames", "region": "the edit region", "first_frame": "the edited first frame",
             "refs": "the reference images", "geometry": "the frame selection, size or mode", "model": "the model (its configs or weights)",
             "video": "the video's contents", "mask": "the mask file's contents", "masks": "the masks folder's contents"}
    seen = []
    inputs_old, inputs_new = old.get("inputs", {}), new.get("inputs", {})
    for k in differences(inputs_old, inputs_new):
        key = k.split(".")[0]
        if key == "first_frame" and (key not in inputs_old or key not in inputs_new):
            continue  # it joins the trained inputs with references (stage 2's CLIP embedding): not a change of its own
        if refs_given and (key == "refs" or key.startswith("ref ")):
            continue  # the --ref change already says it
        label = names.get(key) or (f"reference {key.split()[1]}'s contents" if key.startswith("ref ") else key)
        if label not in seen:
            seen.append(label)
    for k in sorted(set(old) | set(new)):
        if k not in ("settings", "inputs") and old.get(k) != new.get(k):
            seen.append({"texts": "the captions it trains with"}.get(k, k))
    return ", ".join(dict.fromkeys(parts + seen))


# ---------------------------------------------------------------- encode caches no record refers to


def encodings_in_use(run_dir: Path) -> set[str] | None:
    """Keys of the encode caches the run's records refer to: the training's (train/record.json), and
    each render's (RENDER/settings.json) made with the run's current LoRA — a render of a discarded
    LoRA cannot be made again, so its encoding is of no more use. None when that cannot be told (no
    training record, one from before records named their cache, a record that cannot be read)."""
    try:
        train = read_json(run_dir / "train" / "record.json")
        renders = [read_json(p) for p in sorted(run_dir.glob("*/settings.json"))]
    except (OSError, ValueError):
        return None
    if not isinstance(train, dict) or not train.get(ENCODING):
        return None
    used = {train[ENCODING]}
    renders = [r for r in renders if isinstance(r, dict) and r.get(ENCODING)]
    if any(r[ENCODING] not in used for r in renders):
        from loraedit.models import lora_digest

        lora = lora_digest(run_dir)
        used |= {r[ENCODING] for r in renders if r.get("lora") == lora}
    return used


def prune_encodings(run_dir: Path) -> list[Path]:
    """Remove cache/encoded-KEY.safetensors files no record refers to (see encodings_in_use). Called by
    the command holding the run's lock, after it succeeded: no other command can be using one, and
    a cache being written has a hidden temporary name until it is complete (files.atomic_output)."""
    used = encodings_in_use(run_dir)
    if used is None:
        return []
    gone = []
    for p in sorted((run_dir / "cache").glob("encoded-*.safetensors")):
        if p.name.removeprefix("encoded-").removesuffix(".safetensors") not in used:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                gone.append(p)
    if gone:
        logging.getLogger("loraedit").info("removed %d encoding%s no record refers to any more (%s)", len(gone),
                                           "s" * (len(gone) > 1), ", ".join(f"cache/{p.name}" for p in gone))
    return gone


# ---------------------------------------------------------------- one command per run folder


_held: dict[str, int] = {}
last_command: str | None = None  # the innermost command started in this process (for the Ctrl-C message)
last_error: Exception | None = None  # the input error the last cli.main in this process printed (for `batch`)
_held_guard = threading.Lock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str):
    """Hold RUN/.lock (pid, host, command) while a command works on the run folder.

    A second command refuses in one line; a lock left by a dead process on this host is taken
    over. Re-entrant within one process (edit → prepare → train → render). A command that fails
    (a refusal, a mistake in the input) on a run folder it created leaves no empty folder behind.
    """
    global last_command
    last_command = command
    run_dir = Path(run_dir)
    made = missing_folders(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    with _held_guard:
        if key in _held:
            _held[key] += 1
            reentrant = True
        else:
            reentrant = False
    if reentrant:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    lock = run_dir / LOCK_NAME
    host = socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "command": command, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = read_json(lock)
            except (OSError, ValueError):
                holder = {}  # being written this instant, or empty after a crash mid-write
                if time.time() - _mtime(lock) < 5:
                    time.sleep(0.2)
                    continue
            if holder.get("host") == host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]) or not holder:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)  # stale: its process is gone
                continue
            where = f"pid {holder.get('pid')} on {holder.get('host')}"
            raise InputError(f"{run_dir}: is in use by another loraedit command ({holder.get('command', '?')}, {where}, since "
                             f"{holder.get('since', '?')}); wait for it to finish, or use another --out"
                             + (f" (if that process is gone, delete {lock})" if holder.get("host") != host else ""))
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            break
    else:
        raise InputError(f"{lock}: could not take the run folder's lock; delete the file if no loraedit command is running")
    with _held_guard:
        _held[key] = 1
    failed = True
    try:
        yield
        failed = False
        with contextlib.suppress(OSError):  # tidying up is no reason to fail a finished command
            prune_encodings(run_dir)
    finally:
        with _held_guard:
            _held.pop(key, None)
        # a new run folder that the failed command put nothing in goes, lock last: its empty
        # subfolders while the lock is held, then the folder and the parents made for it
        empty = failed and made and not holds_files(run_dir, ignore=(LOCK_NAME,))
        if empty:
            remove_empty_folders(sorted((p for p in run_dir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        if empty:
            remove_empty_folders(made)


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def is_disk_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
