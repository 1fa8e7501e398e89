"""The training pool: every image of --images, plus --variants synthetically distorted versions of each
(distortions.py: 35 types x 5 levels), and a manifest that says which reference each image is a version of.

    python make_pool.py --images /data/koniq10k/1024x768 --out /data/koniq_pool --variants 10 --seed 0
    python make_pool.py --images list.txt --out pool/ --variants 10 --seed 0 --workers 16 --draw group
    python make_pool.py --images small/ --out pool/ --variants 4 --types blur,gaussian_noise,jpeg   # some types only

Layout of --out, the pool root (every name below is relative to it):
    references/<name>            each readable input image, under its name relative to --images (a hard link, or a
                                 copy across filesystems): the authentic images, unchanged
    variants/<stem>_<k>.png      its variants k = 00 .. V-1 (<stem>: the name without its extension)
    manifest.jsonl               one line per image in name order of the references, each followed by its variants:
        {"image": "references/x.jpg", "reference": "references/x.jpg", "type": null, "level": 0, "seed": null}
        {"image": "variants/x_00.png", "reference": "references/x.jpg", "type": "jpeg", "level": 3, "seed": 123}
    references.txt               the references alone, one name a line
    skipped.jsonl                {"image", "reason"} for each input that could not be read (also said on stderr)
    settings.json                the settings below, checked on every rerun
Round 1 votes on the references (`sample_votes.py --images OUT/references.txt`), later rounds on the whole pool
(`--images OUT/manifest.jsonl --pool-manifest OUT/manifest.jsonl`); both list files resolve names against OUT.

Each variant draws a (type, level) with `distortions.draw` (--draw type: uniform over the 35 types, or those --types
names; group: over the groups first), no (type, level) twice for one reference, and a seed; all of it comes from
(--seed, the reference's name) alone, so neither the number of workers nor the order of the work changes a pixel.
The manifest's type and level serve only to pair versions of one reference and to report: no stage reads them.
Settings (a rerun with another value is refused, naming it): --variants, --seed, --draw, --types, the distortion table,
and the inputs (--images and the names it holds). --out may not lie inside --images, nor an input inside --out; image
names must fit on one line of a list (no control characters or line separators).
Rerun the same command to resume after a kill: a variant is written through a temporary file and a rename, a
reference is entered in the manifest only once all its files exist, and the manifest is rewritten sorted and without
duplicates at the end, so the finished pool is the same file for file. A skipped image is tried again on a rerun.
Cost for KonIQ-10k at 1024 x 768 with 10 variants (bench/bench_distortions.py): about 1.5 CPU-seconds per image,
so about 15 minutes on 16 cores, and about 1.1 MB per variant at --png-level 1, so about 110 GB of variants.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one process per core: a BLAS thread pool per process only contends
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import unicodedata  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path, PurePosixPath  # noqa: E402

import numpy as np  # noqa: E402

import common  # noqa: E402
import distortions  # noqa: E402


@dataclass
class Args:
    images: str = common.arg(help="the input images: a folder (recursive) or a list file (.txt, .jsonl)")
    out: str = common.arg(help="the pool root to write (references/, variants/, manifest.jsonl)")
    variants: int = common.arg(10, help="distorted versions per image")
    seed: int = common.arg(0, help="seed of every draw (types, levels, distortion noise)")
    draw: str = common.arg("type", help="type: uniform over the 35 types; group: over the 12 groups, then a type",
                           choices=["type", "group"])
    types: str = common.arg("", help="draw among these only: comma-separated types or groups (default: all 35)")
    workers: int = common.arg(0, help="processes (0: one per CPU core)")
    png_level: int = common.arg(1, help="PNG compress level of the variants, 0-9 (size vs time; same pixels)")


# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the variants of one reference, drawn from (seed, name) alone
# ---------------------------------------------------------------------------------------------------------------------

def variant_plan(name: str, variants: int, seed: int, by: str, kinds: list[str] | None = None
                 ) -> list[tuple[str, int, int]]:
    """(type, level, distortion seed) of each variant of the reference `name`: no (type, level) twice; `kinds`: the
    types to draw among (None: all)."""
    key = int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(key)
    plan, seen = [], set()
    while len(plan) < variants:
        kind, level = distortions.draw(rng, by, kinds)
        if (kind, level) not in seen:
            seen.add((kind, level))
            plan.append((kind, level, int(rng.integers(2 ** 31))))
    return plan


def variant_name(reference: str, k: int) -> str:
    return f"variants/{PurePosixPath(reference).with_suffix('').as_posix()}_{k:02d}.png"


def manifest_records(name: str, plan: list[tuple[str, int, int]]) -> list[dict]:
    """The manifest lines of one reference: itself, then its variants in order."""
    reference = f"references/{name}"
    return [{"image": reference, "reference": reference, "type": None, "level": 0, "seed": None}] + [
        {"image": variant_name(name, k), "reference": reference, "type": kind, "level": level, "seed": seed}
        for k, (kind, level, seed) in enumerate(plan)]


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: one reference's files (runs in a worker process)
# ---------------------------------------------------------------------------------------------------------------------

def place_reference(source: Path, target: Path) -> None:
    """`target` the same file as `source` (a symlinked input: its real file): a hard link, or a copy (written whole or
    not at all) across filesystems."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    source = Path(os.path.realpath(source))  # a hard link of a symlink would be the link itself, dangling if relative
    try:
        os.link(source, target)
    except OSError:
        with open(source, "rb") as f, common.atomic_file(target) as copy:
            shutil.copyfileobj(f, copy)
        shutil.copystat(source, target)


def build_reference(job: tuple) -> tuple[str, str | None]:
    """(name, None) once every file of the reference exists, or (name, the reason it could not be read)."""
    name, source, out, plan, png_level = job
    try:
        image = common.load_image(source)
    except ValueError as e:
        return name, str(e)
    for k, (kind, level, seed) in enumerate(plan):
        path = out / variant_name(name, k)
        if path.exists():  # written whole by an earlier run (atomic_file renames a finished file)
            continue
        with common.atomic_file(path) as f:
            distortions.distort(image, kind, level, seed).save(f, "PNG", compress_level=png_level)
    place_reference(Path(source), out / "references" / name)
    return name, None


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: inputs, resume, settings, the pool of processes
# ---------------------------------------------------------------------------------------------------------------------

def chosen_types(types: str) -> list[str] | None:
    """The types --types names (a group name stands for its types), in table order; None for all."""
    if not types:
        return None
    chosen = set()
    for word in filter(None, (w.strip() for w in types.split(","))):
        if word not in distortions.TABLE and word not in distortions.GROUPS:
            common.die(f"--types: {word!r} is neither a distortion type nor a group (groups: "
                       f"{', '.join(distortions.GROUPS)})")
        chosen.update(distortions.GROUPS.get(word, [word]))
    return [kind for kind in distortions.TABLE if kind in chosen]


def settings_of(args: Args, names: list[str]) -> dict:
    """What defines the pool: the flags, the distortion table, and the inputs (their folder or list, and their names:
    a rerun on other images into the same --out would mix two pools)."""
    table = {kind: params for kind, (_, _, params) in distortions.TABLE.items()}
    listed = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return {"variants": args.variants, "seed": args.seed, "draw": args.draw, "types": chosen_types(args.types),
            "distortions": hashlib.sha256(json.dumps(table).encode()).hexdigest()[:16],
            "distortions_version": distortions.VERSION,
            "images": os.path.abspath(args.images), "inputs": f"{len(names)} images, names sha256 {listed}"}


def finished_references(manifest: Path, plans: dict[str, list]) -> set[str]:
    """The input names whose every manifest line (itself and its variants) is in the manifest: they are done."""
    found: dict[str, set[str]] = {}
    for _, record in common.iter_jsonl(manifest):
        found.setdefault(str(record.get("reference")), set()).add(str(record.get("image")))
    return {name for name, plan in plans.items()
            if {r["image"] for r in manifest_records(name, plan)} <= found.get(f"references/{name}", set())}


def read_inputs(args: Args) -> tuple[Path, list[str]]:
    try:
        root, names = common.list_images(args.images)
    except (FileNotFoundError, ValueError) as e:
        common.die(str(e))
    if not names:
        common.die(f"no images in {args.images}")
    stems: dict[str, str] = {}
    for name in names:
        if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):  # control characters, line breaks
            common.die(f"{args.images}: the image name {name!r} holds a control character or a line separator, which "
                       "a line-based list (references.txt) cannot hold; rename it")
        stem = PurePosixPath(name).with_suffix("").as_posix()
        if stem in stems:
            common.die(f"{args.images}: {stems[stem]} and {name} would share the variant names {stem}_NN.png; "
                       "rename one")
        stems[stem] = name
    return root, names


def refuse_overlap(images: str, root: Path, names: list[str], out: Path) -> None:
    """Die if the pool and its inputs overlap: a pool inside its input folder would be scanned as new inputs on every
    rerun, and an input inside the pool would be one of its own files."""
    root_real, out_real = root.resolve(), out.resolve()
    if out_real.is_relative_to(root_real) and Path(images).is_dir():
        common.die(f"--out {out} is inside --images {images}: every rerun would take the pool's own files as new "
                   "inputs; choose an --out outside it")
    inside = next((name for name in names if (root_real / name).resolve().is_relative_to(out_real)), None)
    if inside is not None:
        common.die(f"--images {images}: {inside} is inside --out {out}, the pool being made; take the inputs from "
                   "outside it")


def main() -> None:
    args = common.parse_args(Args)
    if args.variants < 1 or not 0 <= args.png_level <= 9 or args.workers < 0:
        common.die("--variants must be >= 1, --png-level in 0..9, --workers >= 0")
    kinds = chosen_types(args.types)
    if args.variants > len(kinds or distortions.TABLE) * len(distortions.LEVELS):
        common.die(f"--variants {args.variants}: there are only {len(kinds or distortions.TABLE) * 5} (type, level) "
                   "pairs")
    root, names = read_inputs(args)
    out = Path(args.out)
    refuse_overlap(args.images, root, names, out)
    common.check_writable(out)
    manifest, settings = out / "manifest.jsonl", settings_of(args, names)
    plans = {name: variant_plan(name, args.variants, args.seed, args.draw, kinds) for name in names}
    with common.output_lock(manifest):
        common.refuse_changed_settings(out / "settings.json", settings, f"the pool in {out}",
                                       "rerun with the same flags, or use another --out")
        common.record_settings(out / "settings.json", settings)
        done = finished_references(manifest, plans)
        write_manifest(out, done, plans)  # what a kill left: only whole references, each once
        jobs = [(name, (root / name).as_posix(), out, plans[name], args.png_level) for name in names
                if name not in done]
        skipped = run_jobs(jobs, manifest, args.workers or os.cpu_count() or 1, done, plans)
        write_manifest(out, done, plans)
        common.write_jsonl_atomic(out / "skipped.jsonl", [{"image": name, "reason": reason}
                                                         for name, reason in sorted(skipped.items())])
    print(f"{len(done)} references, {len(done) * args.variants} variants in {out} ({len(skipped)} skipped: "
          f"{out / 'skipped.jsonl'})")


def write_manifest(out: Path, done: set[str], plans: dict[str, list]) -> None:
    """manifest.jsonl and references.txt of the finished references, in name order (atomic rewrites)."""
    common.write_jsonl_atomic(out / "manifest.jsonl", [r for name in sorted(done)
                                                       for r in manifest_records(name, plans[name])])
    common.write_lines_atomic(out / "references.txt", [f"references/{name}\n" for name in sorted(done)])


def run_jobs(jobs: list[tuple], manifest: Path, workers: int, done: set[str], plans: dict[str, list]) -> dict[str, str]:
    """Build the references of `jobs` in `workers` processes; each finished one is appended to the manifest at once
    and added to `done`. Returns {name: reason} of the unreadable ones."""
    from tqdm import tqdm

    skipped: dict[str, str] = {}
    with common.JsonlWriter(manifest) as writer, contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
            results = pool.imap_unordered(build_reference, jobs)
        else:  # no process to start
            results = map(build_reference, jobs)
        for name, reason in tqdm(results, total=len(jobs), desc="references", unit="image", file=sys.stderr):
            if reason:
                print(f"warning: skipped {name}: {reason}", file=sys.stderr)
                skipped[name] = reason
                continue
            for record in manifest_records(name, plans[name]):
                writer.write(record)
            done.add(name)
    return skipped


if __name__ == "__main__":
    common.run_main(main)
