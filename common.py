"""What every EvoQuality stage must agree on, and nothing else.

- model / processor loading, chat inputs with one or two images;
- image loading and image lists (names canonical and kept under their root);
- JSONL I/O that survives a kill (append writer, tolerant reader, atomic rewrite);
- one run record per output (settings checked on a rerun), one lock per output, per-process shards and their merge;
- the tiny argparse adapter that turns each stage's `Args` dataclass into a command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from PIL import Image, ImageOps, UnidentifiedImageError

# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def load_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image with EXIF orientation applied; ValueError naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits, not clip
                import numpy as np

                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
                img = Image.fromarray((arr.clip(0, top) / top * 255).round().astype("uint8"))
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")  # transparent pixels become white, not black
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def safe_name(root: str | os.PathLike, name: str, where: str, allow_outside: bool = False) -> str:
    """`name` as one canonical relative name under `root` ('./a//b.png' and 'a/b.png' are one image). An absolute
    name, or one that climbs out of `root` with '..', is refused naming `where` ("file:line"), unless
    `allow_outside`, which keeps it as an absolute path (for a user who means it)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: expected an image name, got {name!r}")
    normal = os.path.normpath(name)
    if os.path.isabs(normal) or normal == ".." or normal.startswith("../"):
        if allow_outside:
            return os.path.abspath(os.path.join(root, normal))
        raise ValueError(f"{where}: image name {name!r} is outside the image root {root} (absolute or '..'); "
                         "use a name relative to the root, or the stage's flag that allows names outside it")
    return normal


def walk_images(folder: Path) -> list[Path]:
    """Every image file below `folder`, sorted. Symlinked and unreadable subfolders are not entered; each one is
    said on stderr with the reason, so a scan never drops part of a pool silently."""
    found, skipped = [], []
    for top, dirs, files in os.walk(folder, onerror=lambda e: skipped.append(f"{e.filename}: unreadable ({e.strerror})")):
        for d in [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            skipped.append(f"{os.path.join(top, d)}: a symlinked folder (not followed)")
            dirs.remove(d)
        found += [Path(top) / f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    for line in skipped:
        print(f"warning: skipped subfolder {line}", file=sys.stderr)
    return sorted(found)


def list_images(spec: str | os.PathLike, root: str | os.PathLike | None = None,
                allow_outside: bool = False) -> tuple[Path, list[str]]:
    """(root, canonical relative names) of an image pool given as a folder (recursive, sorted) or a list file.

    A list file is .txt (one path per line, '#' comments) or .jsonl (an "image" field: a path or a one-element list).
    Names are resolved against `root`, by default the folder or the list file's folder, and must stay under it
    (`safe_name`); a name listed twice (after normalising) is refused.
    """
    spec = Path(spec)
    if spec.is_dir():
        base = Path(root) if root else spec
        named = [(p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p), str(p))
                 for p in walk_images(spec)]
    elif not spec.is_file():
        raise FileNotFoundError(f"image pool {spec} is neither a folder nor a list file")
    else:
        base = Path(root) if root else spec.parent
        named = []
        if spec.suffix == ".jsonl":
            for lineno, record in read_jsonl(spec, with_lineno=True):
                image = record.get("image")
                image = image[0] if isinstance(image, list) and len(image) == 1 else image
                if not isinstance(image, str):
                    raise ValueError(f"{spec}:{lineno}: expected an 'image' field holding a path")
                named.append((image, f"{spec}:{lineno}"))
        else:
            for lineno, line in enumerate(read_text(spec).splitlines(), 1):
                if line.strip() and not line.strip().startswith("#"):
                    named.append((line.strip(), f"{spec}:{lineno}"))
    images, seen = [], {}
    for name, where in named:
        name = safe_name(base, name, where, allow_outside)
        if name in seen:
            raise ValueError(f"{where}: {name} is listed twice in {spec} (also at {seen[name]})")
        seen[name] = where
        images.append(name)
    return base, images


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file (a BOM is dropped); a file in another encoding is an error naming it."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from e


# ---------------------------------------------------------------------------------------------------------------------
# Files a run makes (locks, temporaries, shards): never written through a link or onto anything planted at their name
# ---------------------------------------------------------------------------------------------------------------------


class PlantedFile(OSError):
    """Something other than a regular file (a symlink, a folder, a FIFO) where a run writes a file of its own: refused,
    never followed; run_main makes it one line."""


def _planted(path: str | os.PathLike) -> Optional[str]:
    """What stands at `path` if it is not a regular file ("a symlink", "a folder", ...); None for a file or nothing."""
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    kinds = {stat.S_IFLNK: "a symlink", stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}
    return None if stat.S_ISREG(mode) else kinds.get(stat.S_IFMT(mode), "a device file")


def _refuse(path: str | os.PathLike, kind: Optional[str]) -> None:
    if kind:
        raise PlantedFile(f"{path}: {kind} stands where this run writes a file of its own; it was not followed or "
                          "overwritten: remove it, or choose another output, and rerun")


def open_own(path: str | os.PathLike, append: bool = False):
    """`path` opened for reading and writing, created if missing (a lock, a JSONL file appended to across runs):
    O_NOFOLLOW, then checks on the open descriptor, so a link, folder, FIFO or second name of another file (a hard
    link) planted at the name is refused (PlantedFile), never followed or blocked on."""
    import stat

    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_APPEND if append else 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError:
        _refuse(path, _planted(path))
        raise
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode) or opened.st_nlink > 1:
        os.close(fd)
        _refuse(path, _planted(path) or ("a hard link to another file" if opened.st_nlink > 1 else "not a file"))
    return os.fdopen(fd, "rb+")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Any]:
    """`path` written whole or not at all: the bytes go to `<path>.tmp`, created exclusively (O_EXCL: nothing at that
    name is ever followed; a regular file a killed run left there is removed first, anything else refused), then
    fsync and a rename onto `path`. A folder at `path` is refused too."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    _refuse(path, "a folder" if _planted(path) == "a folder" else None)
    _refuse(tmp, _planted(tmp))
    tmp.unlink(missing_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except FileExistsError:  # planted between the check and the open
        _refuse(tmp, _planted(tmp) or "a file made meanwhile")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fresh_folder(path: str | os.PathLike) -> Path:
    """An empty folder at `path` made by this run (mkdir never goes through a link): a folder left there (a killed
    save) is removed first; a symlink or anything else at the name is refused (PlantedFile)."""
    import shutil

    path = Path(path)
    if _planted(path) == "a folder":
        shutil.rmtree(path)
    elif os.path.lexists(path):
        _refuse(path, _planted(path) or "a file")
    try:
        os.mkdir(path)
    except FileExistsError:
        _refuse(path, _planted(path) or "a file")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# JSONL that survives a kill
# ---------------------------------------------------------------------------------------------------------------------


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line, streamed. A malformed LAST line (what a kill leaves) is dropped
    with a warning; a malformed line anywhere else raises ValueError naming file:line. A missing file is empty."""
    if not Path(path).exists():
        return
    bad = None  # (line number, reason): an error only once a later non-blank line shows it was not the last one
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.isspace():
                continue
            if bad:
                raise ValueError(f"{path}:{bad[0]}: malformed JSONL line: {bad[1]}")
            try:
                record = json.loads(line.decode("utf-8"))  # decoding here skips json's encoding detection
            except ValueError as e:  # UnicodeDecodeError included
                record = e
            if isinstance(record, dict):
                yield lineno, record
            else:
                bad = (lineno, record if isinstance(record, ValueError) else "not a JSON object")
    if bad:
        warnings.warn(f"{path}:{bad[0]}: dropping a partial last line (an interrupted write)")


def read_jsonl(path: str | os.PathLike, with_lineno: bool = False) -> list:
    """All records of a JSONL file (as `(line number, record)` with `with_lineno`), under iter_jsonl's rules."""
    return [(lineno, record) if with_lineno else record for lineno, record in iter_jsonl(path)]


class JsonlWriter:
    """Appends one flushed JSON line per record. On open, a partial last line left by a kill is cut off first,
    so that new records never glue onto it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open_own(self.path, append=True)
        size = os.fstat(self.file.fileno()).st_size
        self.file.seek(max(size - 1, 0))
        if size and self.file.read(1) != b"\n":
            self.file.seek(0)
            keep = self.file.read().rfind(b"\n") + 1
            warnings.warn(f"{self.path}: cutting a partial last line of {size - keep} bytes")
            self.file.truncate(keep)

    def write(self, record: dict) -> None:
        self.file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.file.flush()

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_lines_atomic(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """A UTF-8 text file written whole or not at all (atomic_file): a reader never sees half a file."""
    with atomic_file(path) as f:
        f.writelines(line.encode("utf-8") for line in lines)


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> None:
    write_lines_atomic(path, (json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_lines_atomic(path, [json.dumps(obj, indent=2, ensure_ascii=False) + "\n"])


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "torchvision", "transformers", "accelerate", "pillow", "numpy", "scipy"]
    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Model, processor, chat inputs
# ---------------------------------------------------------------------------------------------------------------------


def load_processor(name: str, max_pixels: Optional[int] = None, min_pixels: Optional[int] = None,
                   trust_remote_code: bool = False):
    """AutoProcessor with left padding (batched generation needs it) and optional pixel bounds."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    processor.tokenizer.padding_side = "left"
    image_processor = processor.image_processor
    if max_pixels is not None or min_pixels is not None:
        size = dict(image_processor.size)
        size = {"shortest_edge": size.get("shortest_edge"), "longest_edge": size.get("longest_edge")}
        size.update({k: v for k, v in (("longest_edge", max_pixels), ("shortest_edge", min_pixels)) if v is not None})
        image_processor.size = size
        for key, value in (("max_pixels", size["longest_edge"]), ("min_pixels", size["shortest_edge"])):
            if hasattr(image_processor, key):  # older transformers read these attributes instead of `size`
                setattr(image_processor, key, value)
    return processor


def default_dtype(device: Any = None):
    import torch

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(name: str, dtype: Any = None, attn_implementation: Optional[str] = None,
               trust_remote_code: bool = False, device: Any = None):
    """A Qwen-VL-style model from a local path or a hub id (bf16 on GPU, fp32 on CPU unless `dtype` says)."""
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": dtype or default_dtype(device), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise FileNotFoundError(f"model path {name} does not exist (and it is not a hub id of the form org/name)")
    model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    return model.to(device) if device is not None else model


def chat_text(processor, prompt: str, n_images: int, add_vision_id: bool = False) -> str:
    """The chat-template text of one user turn: the images first, then the prompt; generation prompt appended."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         add_vision_id=add_vision_id)


def encode_batch(processor, prompts: list[str], images: list[list[Image.Image]], add_vision_id: bool = False):
    """Left-padded model inputs for a batch of prompts, each with its own list of one or two images."""
    texts = [chat_text(processor, p, len(imgs), add_vision_id) for p, imgs in zip(prompts, images)]
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


# ---------------------------------------------------------------------------------------------------------------------
# Reruns: the settings that define a run's result, recorded once and checked on every rerun
# ---------------------------------------------------------------------------------------------------------------------


def fingerprint(path: str | os.PathLike) -> str:
    """Identity of a file or folder by content metadata (relative name, size, mtime of every file), or the string
    itself for something that is not on disk (a hub id). Cheap enough for a 7B checkpoint or a 10k-image pool."""
    path = Path(path)
    if not path.exists():
        return str(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.relative_to(path) if f != path else f.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def changed_settings(saved: dict, settings: dict) -> list[str]:
    """'name: old -> new' for every setting whose value differs from the saved one."""
    return [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in settings.items() if saved.get(key) != value]


def refuse_changed_settings(path: str | os.PathLike, settings: dict, what: str, remedy: str) -> None:
    """Die naming each changed setting if `path` (a JSON file holding a "settings" object, or the settings
    themselves) records other settings than `settings`; nothing if it does not exist. The caller writes it."""
    path = Path(path)
    if not path.exists():
        return
    saved = read_json(path)
    changes = changed_settings(saved.get("settings", saved), settings)
    if changes:
        die(f"{what} was made with other settings ({'; '.join(changes)}); {remedy}")


def record_settings(path: str | os.PathLike, settings: dict, **extra: Any) -> None:
    """Write the run record {"settings": ..., **extra} that `refuse_changed_settings` checks on a rerun. Called only
    once the run has started for real (model loaded, inputs checked), so a run that failed before doing any work
    leaves nothing that refuses the corrected command."""
    write_json_atomic(path, {"settings": settings, **extra})


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object a run wrote (settings, meta, trainer state, summaries); an empty, cut-off or non-object file is a
    one-line error naming it, not a JSONDecodeError or an AttributeError later."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        die(f"{path} is empty or not valid JSON ({e}); it was cut off or edited: delete it, or the whole output, "
            "and rerun")
    if not isinstance(value, dict):
        die(f"{path} holds {json.dumps(value)[:40]}, not a JSON object; it was edited or is not this program's file: "
            "delete it, or the whole output, and rerun")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Output folders: one run at a time, checked writable, per-process shards merged once
# ---------------------------------------------------------------------------------------------------------------------


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of a process (/proc/PID/stat field 22), so a reused pid is not taken for the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold `<path>.lock` exclusively for the run (flock: the kernel releases it when the process dies, even by
    SIGKILL). The file names the owner (pid, host, start); a second run into the same output fails at once naming
    it (the file's first 4 KB, as one printable line). A lock file left by a dead owner is taken over, and said so; a
    link or anything but a regular file at its name is refused (open_own). In a multi-process run only the main
    process takes it: its processes share one lock."""
    import fcntl
    import socket

    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = open_own(lock)
    owner = " ".join("".join(c if c.isprintable() else " " for c in handle.read(4096).decode("utf-8", "replace"))
                     .split())[:300]  # bounded, one line: whatever the file holds
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        die(f"{path} is in use by another run ({owner or 'owner unknown'}); wait for it to finish or stop it, "
            "or use another output")
    if owner:
        print(f"warning: taking over {lock} from a run that ended without releasing it ({owner})", file=sys.stderr)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')} "
                 f"(process start {_process_start(os.getpid())})\n".encode())
    handle.flush()
    try:
        yield
    finally:
        handle.seek(0)
        handle.truncate()  # an empty lock file is a free one; removing it would race with a waiting run
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def check_writable(folder: str | os.PathLike) -> None:
    """Die, before any model is loaded, if `folder` cannot be created or written (read-only, no permission)."""
    import tempfile

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # nameless or a random name: nothing planted is followed
            pass
    except OSError as e:
        die(f"cannot write to {folder} ({e.strerror}); choose a writable output")


def shard_file(path: str | os.PathLike, rank: int) -> Path:
    """Process `rank`'s append-only part of the JSONL file `path` (merged into `path` by the main process)."""
    return Path(f"{path}.shard-{rank:05d}.jsonl")


def shard_files(path: str | os.PathLike) -> list[Path]:
    """Every process's part of `path` left by any earlier run, whatever its number of processes."""
    return sorted(Path(p) for p in glob.glob(glob.escape(str(path)) + ".shard-*.jsonl"))


def merge_shards(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write the merged `records` to `path` atomically, then delete the shards: a merge killed at any point is
    simply redone by the next run, which reads `path` and the shards again."""
    write_jsonl_atomic(path, records)
    for shard in shard_files(path):
        shard.unlink()


def run_main(main: Callable[[], Any]) -> None:
    """A stage's entry point: an output that fails mid-run (disk full, read-only, no permission) or something planted
    where the run writes its own file is one line naming the file and what to do, exit 2, not a traceback; the stage
    resumes from what it wrote when rerun."""
    try:
        main()
    except PlantedFile as e:
        die(str(e))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM):
            raise
        die(f"{e.filename or 'an output file'}: {e.strerror}; free space or fix permissions, then rerun the same "
            "command (it resumes)")


# ---------------------------------------------------------------------------------------------------------------------
# Args dataclass -> command line (a tiny stand-in for tyro)
# ---------------------------------------------------------------------------------------------------------------------


def arg(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:
    """A dataclass field with a one-line help."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def parse_args(cls, argv: Optional[Iterable[str]] = None):
    """Parse the command line into the `Args` dataclass `cls`: `--field-name VALUE`, `--flag/--no-flag` for bools,
    `--field A B` for lists. Required fields are those without a default."""
    import typing

    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        hint, flag = hints[f.name], "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "dest": f.name}
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        origin, inner = typing.get_origin(hint), typing.get_args(hint)
        if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":  # Optional[X]
            hint = next(a for a in inner if a is not type(None))
            origin, inner = typing.get_origin(hint), typing.get_args(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:  # repeatable: `--bench a --bench b` and `--bench a b` both give [a, b]
            kwargs.update(nargs="*", type=inner[0] if inner else str, action="extend", default=None)
        else:
            kwargs["type"] = hint
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kwargs)
    values = vars(parser.parse_args(None if argv is None else list(argv)))
    for f in dataclasses.fields(cls):  # an absent list flag: the field's own default (extend would mutate a shared one)
        if values[f.name] is None and f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return cls(**values)


def die(message: str, code: int = 2) -> None:
    """One line on stderr and an exit code; for user errors, where a traceback would only hide the message."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
