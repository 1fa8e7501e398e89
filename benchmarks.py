"""The benchmarks evaluate.py reads: the paper's eight sets from the files their official releases ship, and three
generic label formats. Run alone, it says what a folder or file holds, with no model:

    python benchmarks.py koniq=/data/koniq10k csiq=/data/CSIQ tid2013=/data/tid2013/mos_with_names.txt
    python benchmarks.py koniq=/data/koniq10k --split set=test

NAME=PATH[@IMAGE_FOLDER] (evaluate.py --bench takes the same). PATH is
  - a dataset folder as unpacked from its official release: KonIQ-10k, SPAQ, AGIQA-3K, LIVE Challenge (LIVE-Wild),
    KADID-10k, PIPAL, TID2013 or CSIQ (RELEASES below: which file is read, where the images are, which way is better);
  - one of those releases' label files itself (koniq10k_scores_and_distributions.csv, dmos.csv, csiq.DMOS.xlsx, ...);
  - plain JSONL: {"image": "relative/path.jpg", "mos": 3.42} per line;
  - pyiqa meta-info CSV: an image column (name, dist_name, img_name, image_name or image), a MOS column (mos or dmos),
    other columns (std, split, ...) ignored unless `--split COLUMN=VALUE` selects rows by one of them;
  - VisualQuality-R1 JSONL: {"image": ["x.png"], "conversations": [..., {"from": "gpt", "value": 4.63}]}.
IMAGE_FOLDER overrides where the images are (default: the release's image folder, or the label file's folder).
A known release fixes its label direction (KADID-10k's `dmos` is higher-is-better, CSIQ's DMOS lower-is-better);
`--lower-better NAME` is for other files whose labels are lower-is-better.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from xml.etree import ElementTree

import numpy as np

import common


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: generic benchmark files (plain JSONL, pyiqa meta-info CSV, VisualQuality-R1 JSONL)
# ---------------------------------------------------------------------------------------------------------------------

IMAGE_COLUMNS = ("name", "dist_name", "img_name", "image_name", "image")
MOS_COLUMNS = ("mos", "dmos")
FORMATS_HELP = ('plain JSONL ({"image", "mos"} per line), VisualQuality-R1 JSONL ({"image", "conversations"}), a '
                f"CSV with an image column ({', '.join(IMAGE_COLUMNS)}) and a MOS column ({', '.join(MOS_COLUMNS)}), "
                "or a known release's folder or label file")


@dataclass
class Row:
    """One labelled image as its label file lists it."""

    image: str  # the name or relative path the file gives
    label: object  # the raw label, checked by to_mos
    where: str  # "file:line" or "file, sheet S, cell C7": what an error message names
    fields: dict = field(default_factory=dict)  # other columns, for --split


def to_mos(value, where: str) -> float:
    try:
        mos = float(value)  # VisualQuality-R1 files hold numbers, sometimes as strings
    except (TypeError, ValueError):
        raise ValueError(f"{where}: MOS {value!r} is not a number") from None
    if not math.isfinite(mos) or isinstance(value, bool):
        raise ValueError(f"{where}: MOS {value!r} is not a finite number")
    return mos


def read_generic(path: Path) -> tuple[list[Row], str]:
    """(rows, the label's field) of a plain JSONL, VisualQuality-R1 JSONL or pyiqa-style CSV file."""
    text = common.read_text(path)
    first = next((line for line in text.splitlines() if line.strip()), "")
    rows, label = [], "mos"
    if first.lstrip().startswith("{"):
        for lineno, record in common.read_jsonl(path, with_lineno=True):
            image = record.get("image")
            image = image[0] if isinstance(image, list) and len(image) == 1 else image
            if "conversations" in record:  # VisualQuality-R1: the MOS is the last gpt turn
                turns = record["conversations"] if isinstance(record["conversations"], list) else []
                answers = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
                mos, label = (answers[-1] if answers else None), "conversations"
            elif "mos" in record:
                mos = record["mos"]
            else:
                raise ValueError(f"{path}:{lineno}: no 'mos' or 'conversations' field; expected {FORMATS_HELP}")
            rows.append(Row(image, mos, f"{path}:{lineno}", record))
        return rows, label
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    image_col = next((c for c in IMAGE_COLUMNS if c in fields), None)
    mos_col = next((c for c in MOS_COLUMNS if c in fields), None)
    if not (image_col and mos_col):
        raise ValueError(f"{path}: unrecognised benchmark file (starts {first[:60]!r}); expected {FORMATS_HELP}")
    for row in reader:
        rows.append(Row(row.get(image_col), row.get(mos_col), f"{path}:{reader.line_num}", row))
    return rows, mos_col


def select_rows(rows: list[Row], split: Optional[tuple[str, str]] = None, root: Path = Path("."),
                allow_outside: bool = False) -> tuple[list[dict], bool]:
    """([{"image", "mos", "line"}] in file order, whether `split` applied): rows whose `split` column equals the value
    (in files that have the column), labels checked, image names normalised under `root` (common.safe_name),
    duplicates refused. ValueError names the file and line/cell."""
    applied = split is not None and any(split[0] in row.fields for row in rows)
    entries, seen = [], {}
    for row in rows:
        if applied and str(row.fields.get(split[0])) != split[1]:
            continue
        if not isinstance(row.image, str) or not row.image.strip():
            raise ValueError(f"{row.where}: no image path")
        image = common.safe_name(root, row.image, row.where, allow_outside)
        if image in seen:
            raise ValueError(f"{seen[image]} and {row.where}: image {image} is listed twice")
        seen[image] = row.where
        entries.append({"image": image, "mos": to_mos(row.label, row.where), "line": row.where})
    return entries, applied


def read_benchmark(path: Path, split: Optional[tuple[str, str]] = None, root: Optional[Path] = None,
                   allow_outside: bool = False) -> tuple[list[dict], bool, str]:
    """([{"image", "mos", "line"}], whether `split` applied, the label's field) of a generic benchmark file whose
    image names are relative to `root` (default: its folder). Raises ValueError naming file:line on a bad row, a
    duplicate image, a name outside the root, or an unknown format."""
    rows, label = read_generic(path)
    entries, applied = select_rows(rows, split, root or path.parent, allow_outside)
    return entries, applied, label


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: the paper's eight benchmarks, read from the files their official releases ship (no conversion)
# ---------------------------------------------------------------------------------------------------------------------

_XLSX = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
_XLSX_REL = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}id"


def xlsx_rows(path: Path, sheet: Optional[str] = None) -> tuple[str, list[tuple[int, dict[str, object]]]]:
    """(sheet name, [(row number, {column letters: value})]) of one worksheet of an .xlsx file (the first, or `sheet`
    by name), with the standard library: an .xlsx is a zip of XML parts (ECMA-376 / Office Open XML).
    xl/workbook.xml names the sheets, xl/_rels/workbook.xml.rels maps each to its part; a cell <c t="s"> indexes
    xl/sharedStrings.xml, t="inlineStr" holds its text in <is><t>, t="str" a formula's text, t="b" a boolean, and a
    cell with no type (or t="n") a number. ValueError names the file and sheet, or the cell."""
    try:
        with zipfile.ZipFile(path) as z:
            sheets = [(s.get("name"), s.get(_XLSX_REL))
                      for s in ElementTree.fromstring(z.read("xl/workbook.xml")).iter(f"{_XLSX}sheet")]
            names = [name for name, _ in sheets]
            if not sheets or (sheet is not None and sheet not in names):
                raise ValueError(f"{path}: no worksheet {sheet!r}; it has {names}")
            name, rid = sheets[names.index(sheet)] if sheet is not None else sheets[0]
            rels = ElementTree.fromstring(z.read("xl/_rels/workbook.xml.rels"))
            target = next(r.get("Target") for r in rels if r.get("Id") == rid)
            part = target.lstrip("/") if target.startswith("/") else f"xl/{target}"
            shared = []
            if "xl/sharedStrings.xml" in z.namelist():  # rich text keeps its runs in <r><t>; phonetic <rPh> is skipped
                for si in ElementTree.fromstring(z.read("xl/sharedStrings.xml")).iter(f"{_XLSX}si"):
                    shared.append("".join(t.text or "" for t in [*si.findall(f"{_XLSX}t"),
                                                                 *si.findall(f"{_XLSX}r/{_XLSX}t")]))
            xml = ElementTree.fromstring(z.read(part))
    except (zipfile.BadZipFile, KeyError, StopIteration, ElementTree.ParseError, OSError) as e:
        raise ValueError(f"{path}: not a readable .xlsx workbook ({type(e).__name__}: {e})") from None
    rows, number = [], 0
    for row in xml.iter(f"{_XLSX}row"):
        number = int(row.get("r") or number + 1)
        cells = {}
        for c in row.findall(f"{_XLSX}c"):
            ref, kind, v = c.get("r") or "", c.get("t", "n"), c.find(f"{_XLSX}v")
            where = f"{path}, sheet {name!r}, cell {ref}"
            text = v.text if v is not None else None
            if kind == "inlineStr":
                value = "".join(t.text or "" for t in c.iter(f"{_XLSX}t"))
            elif text is None:
                value = None
            elif kind == "s":
                if not text.isdigit() or int(text) >= len(shared):
                    raise ValueError(f"{where}: shared string index {text!r} is out of range ({len(shared)} strings)")
                value = shared[int(text)]
            elif kind in ("str", "e"):  # a formula's text, or an error such as #N/A (a bad label then names its cell)
                value = text
            elif kind == "b":
                value = text == "1"
            else:
                try:
                    value = float(text)
                except ValueError:
                    raise ValueError(f"{where}: number cell holds {text!r}") from None
            cells[re.sub(r"\d+$", "", ref)] = value
        rows.append((number, cells))
    return name, rows


def xlsx_table(path: Path, sheet: Optional[str], columns: tuple[str, ...]) -> list[tuple[str, dict, dict]]:
    """[(where, {header: value}, {header: cell reference})] for the rows below the first row that holds every name in
    `columns` (the header need not be row 1: CSIQ's is row 4). Rows with none of `columns` filled are padding."""
    name, rows = xlsx_rows(path, sheet)
    for i, (_, cells) in enumerate(rows):
        header = {str(v).strip(): col for col, v in cells.items() if isinstance(v, str)}
        if all(c in header for c in columns):
            break
    else:
        raise ValueError(f"{path}, sheet {name!r}: no header row with the columns {list(columns)}")
    table = []
    for number, cells in rows[i + 1:]:
        values = {c: cells.get(header[c]) for c in columns}
        if all(v is None or (isinstance(v, str) and not v.strip()) for v in values.values()):
            continue
        table.append((f"{path}, sheet {name!r}, row {number}", values, {c: f"{header[c]}{number}" for c in columns}))
    return table


def mat_vector(path: Path, key: str) -> np.ndarray:
    """The variable `key` of a MATLAB .mat file, flattened (a cell array comes back as an object array)."""
    from scipy.io import loadmat

    try:
        data = loadmat(path)
    except Exception as e:  # a damaged file raises MatReadError, ValueError, IndexError, ... depending on where
        raise ValueError(f"{path}: cannot read it as a MATLAB .mat file ({type(e).__name__}: {e})") from None
    if key not in data:
        raise ValueError(f"{path}: no variable {key!r}; it holds {sorted(k for k in data if not k.startswith('__'))}")
    return np.asarray(data[key]).ravel()


def csv_table(path: Path, columns: tuple[str, ...]) -> list[tuple[str, dict]]:
    """[(file:line, row)] of a CSV file that must have `columns` (a quoted header is fine)."""
    reader = csv.DictReader(io.StringIO(common.read_text(path)))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}:1: no column {missing}; the header is {reader.fieldnames}")
    return [(f"{path}:{reader.line_num}", row) for row in reader]


@dataclass
class Release:
    """What a known release's reader found: its rows, where its images are, which way is better, and why."""

    dataset: str
    files: list[Path]  # the label file(s) read; their content hashes identify the benchmark
    rows: list[Row]
    image_dirs: tuple[str, ...]  # candidate image folders, relative to the first label file's folder, in order
    lower_better: bool
    label: str  # the label and its direction, in words
    note: str = ""


# KonIQ-10k (database.mmsp-kn.de/koniq-10k-database.html). koniq10k_scores_and_distributions.csv has a quoted header
# "image_name","c1".."c5","c_total","MOS","SD","MOS_zscore" (public loaders read image_name with MOS or MOS_zscore);
# MOS is the 1-5 mean opinion score, higher is better; 10,073 images in 1024x768/ (512x384/ is the half-size copy).
# The official training/validation/test split is the `set` column of koniq10k_distributions_sets.csv
# (github.com/subpic/koniq metadata/, header image_name,c1..c5,c_total,MOS,SD,set; pyiqa's
# scripts/process_koniq10k.py builds its split from it): beside the scores file it adds `set`, so `--split set=test`.
def read_koniq(path: Path) -> Release:
    scores = path.parent / "koniq10k_scores_and_distributions.csv"
    sets_file = path.parent / "koniq10k_distributions_sets.csv"
    label_file = scores if scores.is_file() else path
    rows = [Row(r["image_name"], r["MOS"], where, {}) for where, r in csv_table(label_file, ("image_name", "MOS"))]
    files = [label_file] + ([sets_file] if sets_file.is_file() and sets_file != label_file else [])
    if sets_file.is_file():
        sets = {r["image_name"]: r["set"] for _, r in csv_table(sets_file, ("image_name", "set"))}
        for row in rows:
            row.fields["set"] = sets.get(row.image)
    return Release("KonIQ-10k", files, rows, ("1024x768", "512x384", "."), False,
                   f"MOS of {label_file.name} (higher is better)",
                   "official split in the `set` column" if sets_file.is_file() else "no split file beside it")


# SPAQ (github.com/h4nwei/SPAQ): Annotations/MOS and Image attribute scores.xlsx, first sheet, columns "Image name",
# "MOS" (0-100, higher is better), Brightness, Colorfulness, Contrast, Noisiness, Sharpness; 11,125 smartphone photos
# in TestImage/. Read the same way by pyiqa's scripts/process_spaq.py (pd.read_excel, TestImage as dataroot) and by
# HyperIQA-style SPAQ loaders (info['Image name'], info['MOS'], root/TestImage).
def read_spaq(path: Path) -> Release:
    rows = [Row(str(v["Image name"]).strip() if v["Image name"] is not None else None, v["MOS"],
                f"{where}, cell {cells['MOS']}", {})
            for where, v, cells in xlsx_table(path, None, ("Image name", "MOS"))]
    return Release("SPAQ", [path], rows, ("../TestImage", "TestImage"), False, "MOS, 0-100 (higher is better)")


# AGIQA-3K (github.com/lcysyzxdxc/AGIQA-3k-Database): data.csv with header
# name,prompt,adj1,adj2,style,mos_quality,std_quality,mos_align,std_align (seen in the repository's data.csv);
# mos_quality is the perceptual-quality MOS (higher is better; mos_align is text alignment, not used); the images
# (2,982 in the paper) come in a separate archive, unpacked as AGIQA-3K/ or beside data.csv.
def read_agiqa(path: Path) -> Release:
    rows = [Row(r["name"], r["mos_quality"], where, {}) for where, r in csv_table(path, ("name", "mos_quality"))]
    return Release("AGIQA-3K", [path], rows, ("AGIQA-3K", "AGIQA-3k", "images", "."), False,
                   "mos_quality (higher is better)")


# LIVE In the Wild Image Quality Challenge (live.ece.utexas.edu/research/ChallengeDB): ChallengeDB_release/Data/
# AllImages_release.mat (cell array 'AllImages_release' of 1,169 file names) and AllMOS_release.mat ('AllMOS_release',
# MOS 0-100, higher is better); images in ChallengeDB_release/Images/. The first 7 entries (t1.bmp .. t7.bmp) are the
# images used to train the subjects; related works drop them and evaluate 1,162 images (pyiqa's
# LIVEChallengeDataset: "remove first 7 training images as previous works"; pyiqa docs/Dataset_Preparation.md: "The
# first 7 samples are usually removed"; pyiqa's scripts/process_livechallenge.py reads these two keys). So do we.
LIVEC_TRAINING_ENTRIES = 7


def read_livec(path: Path) -> Release:
    names_file = path.parent / "AllImages_release.mat"
    names, mos = mat_vector(names_file, "AllImages_release"), mat_vector(path, "AllMOS_release")
    if len(names) != len(mos):
        raise ValueError(f"{names_file} lists {len(names)} images but {path} holds {len(mos)} MOS values")
    rows = []
    for i, (item, value) in enumerate(zip(names, mos)):
        name = np.asarray(item).ravel()
        name = str(name[0]) if name.size and isinstance(name[0], str) else None
        if name is None:
            raise ValueError(f"{names_file}, AllImages_release entry {i + 1}: not a file name ({item!r})")
        rows.append(Row(name, float(value), f"{path}, AllMOS_release entry {i + 1}", {}))
    dropped = [row.image for row in rows[:LIVEC_TRAINING_ENTRIES]]
    return Release("LIVE Challenge (LIVE-Wild)", [path, names_file], rows[LIVEC_TRAINING_ENTRIES:],
                   ("../Images", "Images"), False, "MOS, 0-100 (higher is better)",
                   f"the first {LIVEC_TRAINING_ENTRIES} entries ({', '.join(dropped)}) are the subjects' training "
                   "images and are left out, as related works do")


# KADID-10k (database.mmsp-kn.de/kadid-10k-database.html): dmos.csv with header dist_img,ref_img,dmos,var; 10,125
# distorted images (and the 81 references) in images/. Despite its name, `dmos` is HIGHER-is-better: a mean of
# degradation category ratings (ITU-T P.910 DCR, 5 = imperceptible .. 1 = very annoying) on 1-5. pyiqa's
# scripts/process_kadid10k.py copies it unflipped as the MOS; public loaders note "KADID DMOS: 1-5 scale (higher =
# better quality)" and one checked "dmos is quality-oriented" against the raw ratings of all 10,125 images.
def read_kadid(path: Path) -> Release:
    rows = [Row(r["dist_img"], r["dmos"], where, {}) for where, r in csv_table(path, ("dist_img", "dmos"))]
    return Release("KADID-10k", [path], rows, ("images", "."), False,
                   "dmos, 1-5 (higher is better despite the name)")


# PIPAL (github.com/HaomingCai/PIPAL-dataset; NTIRE 2021/2022 IQA challenge): the public part is the training set,
# Train_Label/A0001.txt .. (one file per reference; the dataset repository's README calls the folder
# MOS_Scores_train) with lines "A0001_00_00.bmp,1565.6135": image, Elo score; 23,200 distorted images spread over
# Distortion_1 .. Distortion_4/. Elo is higher-is-better: the dataset's own loader turns two Elo scores into the
# probability that A is preferred, 1 / (1 + 10^((Elo_B - Elo_A) / 400)). pyiqa's scripts/process_pipal.py reads the
# same files. The validation and test labels were not published with the images.
def read_pipal(path: Path) -> Release:
    files = sorted(p for p in path.glob("*.txt"))
    if not files:
        raise ValueError(f"{path}: no label files (*.txt) in this PIPAL label folder")
    rows = []
    for file in files:
        for lineno, line in enumerate(common.read_text(file).splitlines(), 1):
            if not line.strip():
                continue
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 2:
                raise ValueError(f"{file}:{lineno}: expected 'image,elo' (e.g. A0001_00_00.bmp,1565.6135), "
                                 f"got {line[:60]!r}")
            rows.append(Row(parts[0], parts[1], f"{file}:{lineno}", {}))
    return Release("PIPAL", files, rows, ("../Train_Dist", "../Distortion", ".."), False,
                   "Elo score (higher is better)")


# TID2013 (www.ponomarenko.info/tid2013.htm): mos_with_names.txt, lines "5.51429 i01_01_1.bmp" (MOS 0-9, higher is
# better); 3,000 distorted images in distorted_images/. Read so by pyiqa's scripts/process_tid.py, which also finds
# some names on disk with an upper-case "I": file names are matched without regard to case here.
def read_tid2013(path: Path) -> Release:
    rows = []
    for lineno, line in enumerate(common.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'MOS image' (e.g. 5.51429 i01_01_1.bmp), got {line[:60]!r}")
        rows.append(Row(parts[1], parts[0], f"{path}:{lineno}", {}))
    return Release("TID2013", [path], rows, ("distorted_images", "."), False, "MOS, 0-9 (higher is better)")


# CSIQ (s2.smu.edu/~eclarson/csiq.html): csiq.DMOS.xlsx, sheet all_by_image, a header row (row 4, columns D..I)
# image,dst_idx,dst_type,dst_lev,dmos_std,dmos; DMOS 0-1, LOWER is better; 866 rated images. The image of a row is
# dst_imgs/<folder>/<image>.<TOKEN>.<dst_lev>.png, dst_type -> (folder, TOKEN) as public readers of this workbook map
# it: noise -> awgn/AWGN, jpeg -> jpeg/JPEG, jpeg 2000 -> jpeg2000/jpeg2000, fnoise -> fnoise/fnoise,
# blur -> blur/BLUR, contrast -> contrast/contrast (the image name may be a number cell, e.g. 1600).
CSIQ_TYPES = {"noise": ("awgn", "AWGN"), "jpeg": ("jpeg", "JPEG"), "jpeg 2000": ("jpeg2000", "jpeg2000"),
              "fnoise": ("fnoise", "fnoise"), "blur": ("blur", "BLUR"), "contrast": ("contrast", "contrast")}


def read_csiq(path: Path) -> Release:
    rows = []
    for where, v, cells in xlsx_table(path, "all_by_image", ("image", "dst_type", "dst_lev", "dmos")):
        image, kind, level = v["image"], str(v["dst_type"]).strip().lower(), v["dst_lev"]
        if image is None:
            raise ValueError(f"{where}, cell {cells['image']}: no image name")
        image = str(int(image)) if isinstance(image, float) and image.is_integer() else str(image).strip()
        if kind not in CSIQ_TYPES:
            raise ValueError(f"{where}, cell {cells['dst_type']}: unknown dst_type {v['dst_type']!r}; "
                             f"expected one of {sorted(CSIQ_TYPES)}")
        if not isinstance(level, float) or not level.is_integer():
            raise ValueError(f"{where}, cell {cells['dst_lev']}: dst_lev {level!r} is not a whole number")
        folder, token = CSIQ_TYPES[kind]
        rows.append(Row(f"{folder}/{image}.{token}.{int(level)}.png", v["dmos"], f"{where}, cell {cells['dmos']}", {}))
    return Release("CSIQ", [path], rows, ("dst_imgs", "dst_imgs_all", "."), True, "DMOS, 0-1 (lower is better)")


def _has_header(column: str):
    def check(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8-sig") as f:
                return column in next(csv.reader([f.readline()]), [])
        except (OSError, UnicodeDecodeError):
            return False
    return check


# label file (or folder) name -> (its reader, a check that tells it from another file of the same name)
RELEASES = {
    "koniq10k_scores_and_distributions.csv": (read_koniq, None),
    "koniq10k_distributions_sets.csv": (read_koniq, None),
    "MOS and Image attribute scores.xlsx": (read_spaq, None),
    "data.csv": (read_agiqa, _has_header("mos_quality")),
    "AllMOS_release.mat": (read_livec, None),
    "dmos.csv": (read_kadid, _has_header("dist_img")),
    "Train_Label": (read_pipal, Path.is_dir),
    "MOS_Scores_train": (read_pipal, Path.is_dir),
    "mos_with_names.txt": (read_tid2013, None),
    "csiq.DMOS.xlsx": (read_csiq, None),
}


def is_release_file(path: Path) -> bool:
    reader, check = RELEASES.get(path.name, (None, None))
    return reader is not None and (check is None or check(path))


def find_release(folder: Path) -> Path:
    """The label file of the one known release in `folder` (searched two levels down); ValueError otherwise."""
    found = {}
    for depth in ("", "*/", "*/*/"):
        for name in RELEASES:
            for path in sorted(folder.glob(depth + glob_escape(name))):
                if is_release_file(path):
                    found.setdefault(RELEASES[name][0], path)  # the first file name listed wins (KonIQ's scores)
    if folder.name in RELEASES and is_release_file(folder):  # PIPAL's label folder given itself
        found.setdefault(RELEASES[folder.name][0], folder)
    if len(found) != 1:
        what = (f"several releases: {sorted(str(p) for p in found.values())}" if found else
                f"none of the known label files ({', '.join(RELEASES)})")
        raise ValueError(f"{folder}: expected the folder of one dataset release; found {what}")
    return next(iter(found.values()))


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def locate_images(release: Release, rows: list[dict], image_folder: Optional[Path]) -> tuple[Path, list[dict]]:
    """(image root, rows with "image" relative to it). The root is `image_folder` or the first of the release's image
    folders that holds the first listed image; names are matched in that folder and below, ignoring case (TID2013,
    PIPAL's four Distortion_N folders, CSIQ's per-type folders or a flat copy of them)."""
    base = release.files[0].parent
    candidates = [image_folder] if image_folder else [(base / d).resolve() for d in release.image_dirs]
    candidates = [c for c in candidates if c.is_dir()]
    for root in candidates:
        index: dict[str, str] = {}
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() in common.IMAGE_EXTENSIONS:
                index.setdefault(p.name.lower(), p.relative_to(root).as_posix())
        key = lambda image: Path(image).name.lower()  # noqa: E731
        if any(key(r["image"]) in index for r in rows[:50]):
            return root, [{**r, "image": index.get(key(r["image"]), r["image"])} for r in rows]
    tried = ", ".join(str(c) for c in candidates) or "(none of them exists)"
    raise ValueError(f"{release.dataset}: none of the first listed images (e.g. {rows[0]['image'] if rows else '?'}) "
                     f"is in the image folders tried ({tried}); give the image folder as NAME=PATH@IMAGE_FOLDER")


def label_identity(files: list[Path]) -> str:
    """The benchmark's identity by content: the SHA-256 of its label file(s)."""
    if len(files) == 1:
        return common.file_sha256(files[0])
    return hashlib.sha256("".join(f"{f.name}:{common.file_sha256(f)}\n" for f in files).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: --bench specs -> benchmarks (which file, which images, which way is better)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    name: str
    dataset: str  # the release recognised, or "generic file"
    files: list[Path]  # label file(s) read
    root: Path  # image root; entries' images are relative to it
    entries: list[dict]
    lower_better: bool
    label: str  # the label and its direction, in words
    direction_from: str  # "reader", "--lower-better", "assumed (column 'mos')" or "unknown"
    split_applied: bool = False
    note: str = ""

    def source(self) -> dict:
        return {"dataset": self.dataset, "label_files": [str(f.resolve()) for f in self.files],
                "image_root": str(self.root.resolve()), "n_images": len(self.entries), "label": self.label,
                "lower_better": self.lower_better, "direction_from": self.direction_from, "note": self.note}


def parse_bench_spec(spec: str) -> tuple[str, Path, Optional[Path]]:
    """NAME=PATH[@IMAGE_FOLDER] -> (name, path, image folder or None)."""
    name, eq, rest = spec.partition("=")
    if not eq or not rest:
        common.die(f"--bench {spec!r}: expected NAME=PATH[@IMAGE_FOLDER]")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        common.die(f"--bench {spec!r}: NAME may use letters, digits, '_' and '-' only (it names output files)")
    path, _, root = rest.rpartition("@") if "@" in rest else (rest, "", "")
    path, root = Path(path), (Path(root) if root else None)
    if not path.exists():
        common.die(f"--bench {name}: {path} not found")
    if root is not None and not root.is_dir():
        common.die(f"--bench {name}: image folder {root} is not a folder")
    return name, path, root


def load_bench(name: str, path: Path, image_folder: Optional[Path], split: Optional[tuple[str, str]],
               lower_better: list[str], allow_outside: bool = False) -> Bench:
    """A known release (a dataset folder or one of its label files) through its reader, anything else through the
    generic formats. ValueError names the file and line or cell of anything wrong."""
    if path.is_dir() or is_release_file(path):
        label_path = find_release(path) if path.is_dir() else path
        release = RELEASES[label_path.name][0](label_path)
        entries, applied = select_rows(release.rows, split, image_folder or label_path.parent, allow_outside)
        if not entries:
            raise ValueError(f"{name}: {label_path} lists no images" + (" with the --split" if applied else ""))
        if name in lower_better:
            raise ValueError(f"{name} is {release.dataset}, whose direction its reader fixes ({release.label}); "
                             f"drop --lower-better {name}")
        root, entries = locate_images(release, entries, image_folder)
        return Bench(name, release.dataset, release.files, root, entries, release.lower_better, release.label,
                     "reader", applied, release.note)
    entries, applied, label = read_benchmark(path, split, image_folder, allow_outside)
    if not entries:
        raise ValueError(f"{name}: {path} lists no images" + (" with the --split" if applied else ""))
    if name in lower_better:
        direction, words = "--lower-better", f"{label} (lower is better: --lower-better)"
    elif label == "dmos":  # pyiqa's CSIQ and KADID-10k files both call it dmos, with opposite directions
        direction, words = "unknown", "dmos (direction unknown; scored as higher is better)"
    else:
        direction, words = f"assumed (field {label!r})", f"{label} (higher is better)"
    return Bench(name, "generic file", [path], image_folder or path.parent, entries, name in lower_better, words,
                 direction, applied)


def parse_split(text: str) -> Optional[tuple[str, str]]:
    """--split COLUMN=VALUE -> (column, value); None for ""."""
    if not text:
        return None
    column, eq, value = text.partition("=")
    if not eq or not column:
        common.die(f"--split {text!r}: expected COLUMN=VALUE")
    return column, value


def load_benchmarks(specs: list[str], split: Optional[tuple[str, str]], lower_better: list[str], strict: bool,
                    talk: bool, allow_outside: bool = False) -> dict[str, Bench]:
    """name -> Bench for every NAME=PATH spec; dies on bad files, says what was read, warns about missing images."""
    parsed = [parse_bench_spec(spec) for spec in specs]
    names = [name for name, _, _ in parsed]
    if len(set(names)) != len(names):
        common.die(f"--bench: a benchmark name is used twice: {names}")
    unknown = sorted(set(lower_better) - set(names))
    if unknown:
        common.die(f"--lower-better {unknown}: not among the --bench names {names}")
    benchmarks = {}
    for name, path, image_folder in parsed:
        try:
            bench = load_bench(name, path, image_folder, split, lower_better, allow_outside)
        except ValueError as e:
            common.die(str(e))
        entries, root = bench.entries, bench.root
        missing = [e["image"] for e in entries if not (root / e["image"]).is_file()]
        if len(missing) == len(entries):
            common.die(f"{name}: none of its {len(entries)} images is under {root} (e.g. {root / missing[0]}); "
                       "give the image folder as NAME=PATH@IMAGE_FOLDER")
        if missing and strict:
            common.die(f"{name}: {len(missing)} images missing under {root}, e.g. {missing[:3]} (--strict)")
        if talk:
            print(f"{name}: {bench.dataset} from {', '.join(str(f) for f in bench.files)}; images in {root}: "
                  f"{len(entries)} images; label {bench.label}" + (f"; {bench.note}" if bench.note else ""),
                  file=sys.stderr)
            if missing:
                warnings.warn(f"{name}: {len(missing)} of {len(entries)} images are missing under {root}; "
                              "they are excluded and listed in summary.json")
            if bench.direction_from == "unknown":
                warnings.warn(f"{name}: the direction of its '{bench.label.split()[0]}' labels is unknown; pass "
                              f"--lower-better {name} if lower is better (CSIQ-style DMOS), nothing if higher is")
        benchmarks[name] = bench
    if split is not None:
        if not any(b.split_applied for b in benchmarks.values()):
            common.die(f"--split {'='.join(split)}: no benchmark has a column {split[0]!r}")
        for b in benchmarks.values():
            if not b.split_applied and talk:
                print(f"note: {b.name} has no column {split[0]!r}; --split does not apply to it", file=sys.stderr)
    return benchmarks


IMAGES = "--images"  # the name of an unlabelled image set (no NAME=PATH spec can spell it)


def load_images(spec: str, allow_outside: bool = False) -> Bench:
    """An image folder (recursively) or list file as a benchmark without labels; listed names stay under the list's
    folder unless `allow_outside`, and one file is one image however it is written (common.list_images)."""
    try:
        root, images = common.list_images(spec, allow_outside=allow_outside)
    except (FileNotFoundError, ValueError) as e:
        common.die(str(e))
    if not images:
        common.die(f"--images {spec}: no images there")
    return Bench(IMAGES, IMAGES, [Path(spec)], root, [{"image": i} for i in images], False, "none", "none")


def main(argv: Optional[list[str]] = None) -> dict[str, Bench]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", nargs="+", help="NAME=PATH[@IMAGE_FOLDER], PATH a dataset folder or label file")
    parser.add_argument("--split", default="", help="COLUMN=VALUE: keep only rows whose COLUMN equals VALUE")
    parser.add_argument("--lower-better", nargs="*", default=[], help="NAMEs of generic files labelled lower-is-better")
    parser.add_argument("--allow-outside-root", action="store_true", help="accept absolute or '..' image names")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same facts are printed below
        benchmarks = load_benchmarks(args.bench, parse_split(args.split), args.lower_better, False, False,
                                     args.allow_outside_root)
    for name, b in benchmarks.items():
        present = sum((b.root / e["image"]).is_file() for e in b.entries)
        print(f"{name}: {b.dataset}\n  label file(s): {', '.join(str(f) for f in b.files)}\n  image folder: {b.root}\n"
              f"  images: {len(b.entries)} listed, {present} found" + (f" (split {args.split})" if b.split_applied
                                                                        else "")
              + f"\n  label: {b.label} (direction from {b.direction_from})" + (f"\n  note: {b.note}" if b.note else ""))
    return benchmarks


if __name__ == "__main__":
    main()
