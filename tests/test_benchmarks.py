"""benchmarks.py: the three generic formats; the readers of the paper's eight benchmarks, for each set a small replica
of its official release files (the exact file, header, sheet and variable names; a few rows; tiny synthetic images),
parsed to the expected (image, label, direction); the stdlib .xlsx reader against a workbook built here with zipfile;
a malformed file of each kind -> an error naming the file and line or cell; the direction reported in summary.json;
the script run alone."""

import json
import math
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest
import scipy.io

import common
import sampling
import benchmarks
import evaluate
from fixtures.synthetic import make_image

ROOT = Path(__file__).resolve().parents[1]


def image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(seed, size=32)[0].save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def column(index: int) -> str:
    return chr(ord("A") + index)  # enough for these replicas (columns A..Z)


def write_xlsx(path: Path, sheet: str, cells: dict[tuple[int, int], object], inline_strings: bool = False) -> Path:
    """A minimal real .xlsx (Office Open XML parts in a zip): strings in the shared-strings table (or inline with
    `inline_strings`), numbers inline in <v>. `cells` maps (row number, column index) -> value."""
    shared: list[str] = []
    rows: dict[int, list[str]] = {}
    for (r, c), value in sorted(cells.items()):
        ref = f"{column(c)}{r}"
        if isinstance(value, str) and inline_strings:
            xml = f'<c r="{ref}" t="inlineStr"><is><t>{escape(value)}</t></is></c>'
        elif isinstance(value, str):
            shared.append(value)
            xml = f'<c r="{ref}" t="s"><v>{len(shared) - 1}</v></c>'
        else:
            xml = f'<c r="{ref}"><v>{value}</v></c>'
        rows.setdefault(r, []).append(xml)
    main = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rel = 'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"'
    sheet_xml = (f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><worksheet {main} {rel}><sheetData>'
                 + "".join(f'<row r="{r}">{"".join(c)}</row>' for r, c in sorted(rows.items()))
                 + "</sheetData></worksheet>")
    strings = (f'<?xml version="1.0" encoding="UTF-8"?><sst {main} count="{len(shared)}" uniqueCount="{len(shared)}">'
               + "".join(f"<si><t>{escape(s)}</t></si>" for s in shared) + "</sst>")
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/'
                   'package/2006/content-types"/>')
        z.writestr("xl/workbook.xml", f'<?xml version="1.0"?><workbook {main} {rel}><sheets>'
                   f'<sheet name="{escape(sheet)}" sheetId="1" r:id="rId1"/></sheets></workbook>')
        z.writestr("xl/_rels/workbook.xml.rels",
                   '<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/'
                   'relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/'
                   '2006/relationships/worksheet" Target="worksheets/sheet1.xml"/></Relationships>')
        z.writestr("xl/worksheets/sheet1.xml", sheet_xml)
        if shared:
            z.writestr("xl/sharedStrings.xml", strings)
    return path


def table(header: list[str], rows: list[list], first_row: int = 1, first_col: int = 0) -> dict:
    cells = {(first_row, first_col + i): h for i, h in enumerate(header)}
    for r, row in enumerate(rows, first_row + 1):
        cells.update({(r, first_col + i): v for i, v in enumerate(row) if v is not None})
    return cells


def loaded(folder: Path, split=None, name: str = "b", image_folder=None, lower_better=()):
    bench = benchmarks.load_bench(name, folder, image_folder, split, list(lower_better))
    return bench, [(e["image"], e["mos"]) for e in bench.entries]


# ---------------------------------------------------------------------------------------------------------------------
# the generic formats
# ---------------------------------------------------------------------------------------------------------------------


def test_three_formats_are_detected_and_parsed(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"image": "a.png", "mos": 3.42}\n\n{"image": "b.png", "mos": 1}\n')
    entries, applied, label = benchmarks.read_benchmark(plain)
    assert [(e["image"], e["mos"], e["line"]) for e in entries] == [("a.png", 3.42, f"{plain}:1"),
                                                                    ("b.png", 1.0, f"{plain}:3")]
    assert (applied, label) == (False, "mos")

    vqr1 = tmp_path / "vqr1.jsonl"
    vqr1.write_text("\n".join(json.dumps(r) for r in [
        {"image": ["x.png"], "conversations": [{"from": "human", "value": "<image>rate"},
                                               {"from": "gpt", "value": 4.63}]},
        {"image": ["y.png"], "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "2.5"}]},
    ]) + "\n")
    entries, _, label = benchmarks.read_benchmark(vqr1)
    assert [(e["image"], e["mos"]) for e in entries] == [("x.png", 4.63), ("y.png", 2.5)] and label == "conversations"

    csv_file = tmp_path / "meta_info_X.csv"
    csv_file.write_text("ref_name,dist_name,mos,std,split\nr.png,d1.png,0.5,0.1,train\n"
                        "r.png,d2.png,0.7,0.1,test\nr.png,d3.png,0.2,0.1,test\n")
    entries, applied, label = benchmarks.read_benchmark(csv_file)
    assert [e["image"] for e in entries] == ["d1.png", "d2.png", "d3.png"] and not applied and label == "mos"
    entries, applied, _ = benchmarks.read_benchmark(csv_file, ("split", "test"))
    assert [(e["image"], e["mos"], e["line"]) for e in entries] == [("d2.png", 0.7, f"{csv_file}:3"),
                                                                    ("d3.png", 0.2, f"{csv_file}:4")] and applied
    koniq = tmp_path / "koniq.csv"  # pyiqa's KonIQ file names its column img_name
    koniq.write_text("img_name,mos,std,split\n1.jpg,77.3,0.5,training\n")
    assert benchmarks.read_benchmark(koniq)[0][0]["image"] == "1.jpg"
    csiq = tmp_path / "csiq.csv"
    csiq.write_text("ref_name,dist_name,dmos\nr.png,d.png,0.06\n")
    assert benchmarks.read_benchmark(csiq)[2] == "dmos"


@pytest.mark.parametrize("text,match", [
    ('{"image": "a.png", "mos": 3}\n{"image": "b.png", "mos": 2}\n{"image": "a.png", "mos": 4}\n',
     r"bad\.jsonl:1 and .*bad\.jsonl:3: image a\.png is listed twice"),
    ('{"image": "a.png", "mos": 3}\n{"image": "b.png", "mos": "good"}\n', r"bad\.jsonl:2: MOS 'good' is not a number"),
    ('{"image": "a.png", "mos": 3}\n{"image": "b.png", "mos": null}\n', r"bad\.jsonl:2: MOS None is not a number"),
    ('{"image": "a.png", "mos": 3}\n{"image": "b.png", "mos": NaN}\n', r"bad\.jsonl:2: MOS nan is not a finite"),
    ('{"image": "a.png", "quality": 3}\n', r"bad\.jsonl:1: no 'mos' or 'conversations'"),
    ("file,score\na.png,3\n", r"unrecognised benchmark file"),
])
def test_bad_benchmark_files_name_the_line(tmp_path, text, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    with pytest.raises(ValueError, match=match):
        benchmarks.read_benchmark(bad)


def test_run_alone_it_says_what_a_folder_holds(tmp_path, demo_bench):
    kadid = tmp_path / "kadid10k"
    write(kadid / "dmos.csv", "dist_img,ref_img,dmos,var\na.png,r.png,4.5,0.4\nb.png,r.png,2.0,0.4\n")
    image(kadid / "images" / "a.png")
    run = subprocess.run([sys.executable, "benchmarks.py", f"kadid={kadid}", f"demo={demo_bench / 'labels.jsonl'}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "kadid: KADID-10k", f"  label file(s): {kadid / 'dmos.csv'}", f"  image folder: {(kadid / 'images').resolve()}",
        "  images: 2 listed, 1 found", "  label: dmos, 1-5 (higher is better despite the name) (direction from reader)",
        "demo: generic file", f"  label file(s): {demo_bench / 'labels.jsonl'}", f"  image folder: {demo_bench}",
        "  images: 12 listed, 12 found", "  label: mos (higher is better) (direction from assumed (field 'mos'))"]


# ---------------------------------------------------------------------------------------------------------------------
# the stdlib .xlsx reader
# ---------------------------------------------------------------------------------------------------------------------


def test_xlsx_reader_shared_strings_inline_numbers_and_inline_strings(tmp_path):
    cells = {(1, 0): "title, with a comma & <xml>", (3, 1): 1600, (3, 2): 0.0625, (3, 3): "jpeg 2000", (4, 1): -2.5e-3}
    sheet, rows = benchmarks.xlsx_rows(write_xlsx(tmp_path / "a.xlsx", "all_by_image", cells))
    assert sheet == "all_by_image"
    assert rows == [(1, {"A": "title, with a comma & <xml>"}), (3, {"B": 1600.0, "C": 0.0625, "D": "jpeg 2000"}),
                    (4, {"B": -0.0025})]
    _, inline = benchmarks.xlsx_rows(write_xlsx(tmp_path / "b.xlsx", "S", cells, inline_strings=True))
    assert inline == rows
    with zipfile.ZipFile(tmp_path / "a.xlsx") as z:  # really shared: the sheet holds indexes, the strings elsewhere
        assert "jpeg 2000" not in z.read("xl/worksheets/sheet1.xml").decode()
        assert "jpeg 2000" in z.read("xl/sharedStrings.xml").decode()


@pytest.mark.parametrize("damage,match", [
    ("not a zip", r"bad\.xlsx: not a readable \.xlsx workbook"),
    ("index", r"bad\.xlsx, sheet 'all_by_image', cell D5: shared string index '99' is out of range"),
    ("number", r"bad\.xlsx, sheet 'all_by_image', cell I5: number cell holds 'abc'"),
    ("sheet", r"bad\.xlsx: no worksheet 'all_by_image'; it has \['Sheet1'\]"),
])
def test_malformed_xlsx_names_the_file_and_cell(tmp_path, damage, match):
    path = write_xlsx(tmp_path / "bad.xlsx", "Sheet1" if damage == "sheet" else "all_by_image",
                      table(["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"],
                            [["1600", 1, "noise", 1, 0.01, 0.06]], first_row=4, first_col=3))
    if damage == "not a zip":
        path.write_bytes(b"PK\x03\x04 truncated")
    elif damage in ("index", "number"):
        with zipfile.ZipFile(path) as z:
            parts = {n: z.read(n) for n in z.namelist()}
        xml = parts["xl/worksheets/sheet1.xml"].decode()
        xml = (xml.replace('<c r="D5" t="s"><v>6</v>', '<c r="D5" t="s"><v>99</v>') if damage == "index" else
               xml.replace('<c r="I5"><v>0.06</v>', '<c r="I5"><v>abc</v>'))
        parts["xl/worksheets/sheet1.xml"] = xml.encode()
        with zipfile.ZipFile(path, "w") as z:
            for n, data in parts.items():
                z.writestr(n, data)
    with pytest.raises(ValueError, match=match):
        benchmarks.read_csiq(path)


# ---------------------------------------------------------------------------------------------------------------------
# each release from a replica of its files
# ---------------------------------------------------------------------------------------------------------------------


def test_koniq10k_scores_csv_with_quoted_header_and_the_official_split(tmp_path):
    root = tmp_path / "koniq10k"
    head = '"image_name","c1","c2","c3","c4","c5","c_total","MOS","SD","MOS_zscore"\n'
    write(root / "koniq10k_scores_and_distributions.csv", head +
          '"10004473376.jpg",0,0,25,73,7,105,3.828571429,0.527277894,77.38362069\n'
          '"10007357496.jpg",0,3,45,47,1,96,3.479166667,0.580003025,68.72857143\n'
          '"10020766793.jpg",0,0,11,78,20,109,4.082568807,0.529297934,81.50625\n')
    write(root / "koniq10k_distributions_sets.csv", "image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,set\n"
          "10004473376.jpg,0.0,0.0,0.238,0.695,0.0667,105,77.3836206897,0.527,training\n"
          "10007357496.jpg,0.0,0.031,0.469,0.490,0.0104,96,68.7285714286,0.580,test\n"
          "10020766793.jpg,0.0,0.0,0.101,0.716,0.183,109,81.50625,0.529,test\n")
    for i, name in enumerate(["10004473376.jpg", "10007357496.jpg", "10020766793.jpg"]):
        image(root / "1024x768" / name, i)
        image(root / "512x384" / name, i)
    bench, rows = loaded(root)
    assert rows == [("10004473376.jpg", 3.828571429), ("10007357496.jpg", 3.479166667),
                    ("10020766793.jpg", 4.082568807)]  # MOS (1-5), not MOS_zscore
    assert (bench.dataset, bench.lower_better, bench.root) == ("KonIQ-10k", False, (root / "1024x768").resolve())
    assert [f.name for f in bench.files] == ["koniq10k_scores_and_distributions.csv", "koniq10k_distributions_sets.csv"]
    test, rows = loaded(root, split=("set", "test"))
    assert test.split_applied and [r[0] for r in rows] == ["10007357496.jpg", "10020766793.jpg"]
    same, rows_file = loaded(root / "koniq10k_scores_and_distributions.csv")  # the label file itself: same reader
    assert same.dataset == "KonIQ-10k" and rows_file == [r for r in loaded(root)[1]]


def test_spaq_excel_sheet(tmp_path):
    root = tmp_path / "SPAQ"
    header = ["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"]
    write_xlsx(root / "Annotations" / "MOS and Image attribute scores.xlsx", "Sheet1",
               table(header, [["00001.jpg", 42.65, 45.1, 35.3, 42.2, 46.1, 43.4],
                              ["00002.jpg", 74.4, 68.3, 66.8, 70.2, 70.9, 75.4]]))
    image(root / "TestImage" / "00001.jpg", 1)
    image(root / "TestImage" / "00002.jpg", 2)
    bench, rows = loaded(root)
    assert rows == [("00001.jpg", 42.65), ("00002.jpg", 74.4)]
    assert (bench.dataset, bench.lower_better, bench.root) == ("SPAQ", False, (root / "TestImage").resolve())


def test_agiqa3k_data_csv_with_quoted_prompts(tmp_path):
    root = tmp_path / "AGIQA-3K"
    write(root / "data.csv", "name,prompt,adj1,adj2,style,mos_quality,std_quality,mos_align,std_align\n"
          "AttnGAN_normal_000.jpg,statue of a man,,,,0.965602553,0.223270101,0.40889324,0.615607722\n"
          'AttnGAN_normal_060.jpg,"artwork with only triangles, anime style",,,anime style,0.919776796,0.719282241,'
          "0.850496237,0.842552058\n")
    image(root / "AGIQA-3K" / "AttnGAN_normal_000.jpg", 3)
    image(root / "AGIQA-3K" / "AttnGAN_normal_060.jpg", 4)
    bench, rows = loaded(root)
    assert rows == [("AttnGAN_normal_000.jpg", 0.965602553), ("AttnGAN_normal_060.jpg", 0.919776796)]  # quality
    assert (bench.dataset, bench.lower_better) == ("AGIQA-3K", False)


def test_live_challenge_mat_files_drop_the_seven_training_images(tmp_path):
    root = tmp_path / "ChallengeDB_release"
    names = [f"t{i}.bmp" for i in range(1, 8)] + ["100.bmp", "1000.JPG"]
    cell = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        cell[i, 0] = np.array([n])
    (root / "Data").mkdir(parents=True)
    scipy.io.savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": cell})
    mos = np.array([[63.96, 25.34, 48.94, 35.89, 66.51, 54.58, 77.88, 32.56, 66.36]])
    scipy.io.savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": mos})
    scipy.io.savemat(root / "Data" / "AllStdDev_release.mat", {"AllStdDev_release": mos / 4})
    for i, n in enumerate(names):
        image(root / "Images" / ("trainingImages/" if n.startswith("t") else "") / n, i)
    bench, rows = loaded(tmp_path / "ChallengeDB_release")
    assert rows == [("100.bmp", 32.56), ("1000.JPG", 66.36)]
    assert bench.dataset.startswith("LIVE Challenge") and not bench.lower_better and "t1.bmp" in bench.note
    assert bench.root == (root / "Images").resolve()


def test_kadid10k_dmos_is_higher_better(tmp_path):
    root = tmp_path / "kadid10k"
    write(root / "dmos.csv", "dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4.57,0.496\n"
          "I01_01_05.png,I01.png,1.87,0.611\n")
    for i, n in enumerate(["I01_01_01.png", "I01_01_05.png", "I01.png"]):
        image(root / "images" / n, i)
    bench, rows = loaded(root)
    assert rows == [("I01_01_01.png", 4.57), ("I01_01_05.png", 1.87)]
    assert (bench.dataset, bench.lower_better, bench.direction_from) == ("KADID-10k", False, "reader")
    with pytest.raises(ValueError, match="direction its reader fixes"):  # --lower-better would flip its sign
        loaded(root, name="kadid", lower_better=["kadid"])


def test_pipal_elo_label_files_and_four_distortion_folders(tmp_path):
    root = tmp_path / "PIPAL"
    write(root / "Train_Label" / "A0001.txt", "A0001_00_00.bmp,1565.6135\nA0001_10_05.bmp,1398.2514\n")
    write(root / "Train_Label" / "A0002.txt", "A0002_01_03.bmp,1478.0\n")
    image(root / "Train_Ref" / "A0001.bmp")
    image(root / "Distortion_1" / "A0001_00_00.bmp", 1)
    image(root / "Distortion_3" / "A0001_10_05.bmp", 2)
    image(root / "Distortion_2" / "A0002_01_03.bmp", 3)
    bench, rows = loaded(root)
    assert rows == [("Distortion_1/A0001_00_00.bmp", 1565.6135), ("Distortion_3/A0001_10_05.bmp", 1398.2514),
                    ("Distortion_2/A0002_01_03.bmp", 1478.0)]
    assert (bench.dataset, bench.lower_better, bench.root) == ("PIPAL", False, root.resolve())
    assert len(bench.files) == 2


def test_tid2013_mos_with_names_matches_file_names_without_case(tmp_path):
    root = tmp_path / "tid2013"
    write(root / "mos_with_names.txt", "5.51429 i01_01_1.bmp\n5.56757 i01_01_2.bmp\n\n4.94444 i25_24_5.bmp\n")
    image(root / "distorted_images" / "i01_01_1.bmp", 1)
    image(root / "distorted_images" / "I01_01_2.BMP", 2)  # upper case on disk, lower case in the label file
    image(root / "distorted_images" / "i25_24_5.bmp", 3)
    image(root / "reference_images" / "I01.BMP")
    bench, rows = loaded(root)
    assert rows == [("i01_01_1.bmp", 5.51429), ("I01_01_2.BMP", 5.56757), ("i25_24_5.bmp", 4.94444)]
    assert (bench.dataset, bench.lower_better) == ("TID2013", False)


def csiq_workbook(path: Path, dmos_cell=0.0617) -> Path:
    header = ["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"]
    cells = table(header, [[1600, 1, "noise", 1, 0.0345, dmos_cell], ["aerial_city", 3, "jpeg 2000", 2, 0.04, 0.289],
                           ["1600", 6, "contrast", 5, 0.08, 0.512]], first_row=4, first_col=3)
    cells[(1, 0)] = "CSIQ DMOS"  # the sheet's title rows above the header
    return write_xlsx(path, "all_by_image", cells)


def test_csiq_workbook_header_in_row_4_and_dmos_lower_better(tmp_path):
    root = tmp_path / "CSIQ"
    csiq_workbook(root / "csiq.DMOS.xlsx")
    image(root / "dst_imgs" / "awgn" / "1600.AWGN.1.png", 1)
    image(root / "dst_imgs" / "jpeg2000" / "aerial_city.jpeg2000.2.png", 2)
    image(root / "dst_imgs" / "contrast" / "1600.contrast.5.png", 3)
    image(root / "src_imgs" / "1600.png")
    bench, rows = loaded(root)
    assert rows == [("awgn/1600.AWGN.1.png", 0.0617), ("jpeg2000/aerial_city.jpeg2000.2.png", 0.289),
                    ("contrast/1600.contrast.5.png", 0.512)]
    assert (bench.dataset, bench.lower_better, bench.root) == ("CSIQ", True, (root / "dst_imgs").resolve())
    assert bench.entries[0]["line"].endswith("csiq.DMOS.xlsx, sheet 'all_by_image', row 5, cell I5")


# ---------------------------------------------------------------------------------------------------------------------
# malformed files of each kind, and folders that are not one release
# ---------------------------------------------------------------------------------------------------------------------


def test_malformed_release_files_name_the_file_and_line_or_cell(tmp_path):
    koniq = write(tmp_path / "k" / "koniq10k_scores_and_distributions.csv",
                  '"image_name","MOS"\n"a.jpg",3.1\n"b.jpg",abc\n')
    with pytest.raises(ValueError, match=r"koniq10k_scores_and_distributions\.csv:3: MOS 'abc' is not a number"):
        loaded(koniq)
    kadid = write(tmp_path / "d" / "dmos.csv", "dist_img,ref_img,var\nI01_01_01.png,I01.png,0.4\n")
    with pytest.raises(ValueError, match=r"dmos\.csv:1: no column \['dmos'\]"):
        loaded(kadid)
    tid = write(tmp_path / "t" / "mos_with_names.txt", "5.5 i01_01_1.bmp\n5.1 i01_01_2.bmp extra\n")
    with pytest.raises(ValueError, match=r"mos_with_names\.txt:2: expected 'MOS image'"):
        loaded(tid)
    write(tmp_path / "p" / "Train_Label" / "A0001.txt", "A0001_00_00.bmp,1565.6\nA0001_00_01.bmp 1498\n")
    with pytest.raises(ValueError, match=r"A0001\.txt:2: expected 'image,elo'"):
        loaded(tmp_path / "p")
    csiq = csiq_workbook(tmp_path / "c" / "csiq.DMOS.xlsx", dmos_cell="n/a")
    with pytest.raises(ValueError, match=r"csiq\.DMOS\.xlsx, sheet 'all_by_image', row 5, cell I5: MOS 'n/a' is not"):
        loaded(csiq)
    spaq = write_xlsx(tmp_path / "s" / "MOS and Image attribute scores.xlsx", "Sheet1", table(["name", "MOS"], []))
    with pytest.raises(ValueError, match=r"sheet 'Sheet1': no header row with the columns \['Image name', 'MOS'\]"):
        loaded(spaq)


@pytest.mark.parametrize("damage,match", [
    ("junk", r"AllMOS_release\.mat: cannot read it as a MATLAB \.mat file"),
    ("key", r"AllMOS_release\.mat: no variable 'AllMOS_release'; it holds \['MOS'\]"),
    ("nan", r"AllMOS_release\.mat, AllMOS_release entry 9: MOS nan is not a finite number"),
    ("length", r"AllImages_release\.mat lists 9 images but .*AllMOS_release\.mat holds 8 MOS values"),
])
def test_malformed_mat_files_name_the_file_and_entry(tmp_path, damage, match):
    data = tmp_path / "Data"
    data.mkdir()
    cell = np.empty((9, 1), dtype=object)
    for i in range(9):
        cell[i, 0] = np.array([f"{i}.bmp"])
    scipy.io.savemat(data / "AllImages_release.mat", {"AllImages_release": cell})
    mos = np.linspace(10, 90, 9)[None, :]
    if damage == "nan":
        mos[0, 8] = np.nan
    scipy.io.savemat(data / "AllMOS_release.mat", {"MOS" if damage == "key" else "AllMOS_release":
                                                   mos[:, :8] if damage == "length" else mos})
    if damage == "junk":
        (data / "AllMOS_release.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(ValueError, match=match):
        loaded(data / "AllMOS_release.mat")


def test_folder_holding_no_release_or_several_is_refused(tmp_path):
    write(tmp_path / "a" / "notes.csv", "x,y\n1,2\n")
    with pytest.raises(ValueError, match="none of the known label files"):
        loaded(tmp_path / "a")
    write(tmp_path / "all" / "tid2013" / "mos_with_names.txt", "5.5 i01_01_1.bmp\n")
    write(tmp_path / "all" / "kadid10k" / "dmos.csv", "dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4.5,0.4\n")
    with pytest.raises(ValueError, match="several releases"):
        loaded(tmp_path / "all")
    write(tmp_path / "x" / "data.csv", "name,mos\na.png,3\n")  # a data.csv without mos_quality is not AGIQA-3K
    with pytest.raises(ValueError, match="none of the known label files"):
        loaded(tmp_path / "x")


def test_images_outside_the_known_folders_need_the_image_folder(tmp_path):
    root = tmp_path / "kadid10k"
    write(root / "dmos.csv", "dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4.57,0.496\n")
    elsewhere = tmp_path / "pictures"
    image(elsewhere / "I01_01_01.png")
    with pytest.raises(ValueError, match=r"NAME=PATH@IMAGE_FOLDER"):
        loaded(root)
    bench, rows = loaded(root, image_folder=elsewhere)
    assert bench.root == elsewhere and rows == [("I01_01_01.png", 4.57)]


# ---------------------------------------------------------------------------------------------------------------------
# the direction reaches summary.json; the warning only where it is unknown
# ---------------------------------------------------------------------------------------------------------------------


def test_direction_in_summary_and_warning_only_when_unknown(monkeypatch, tmp_path, tiny_model_dir):
    csiq = tmp_path / "CSIQ"
    csiq_workbook(csiq / "csiq.DMOS.xlsx")
    paths = ["awgn/1600.AWGN.1.png", "jpeg2000/aerial_city.jpeg2000.2.png", "contrast/1600.contrast.5.png"]
    for i, p in enumerate(paths):
        image(csiq / "dst_imgs" / p, i)
    kadid = tmp_path / "kadid10k"
    write(kadid / "dmos.csv", "dist_img,ref_img,dmos,var\na.png,r.png,4.5,0.4\nb.png,r.png,2.0,0.4\n"
          "c.png,r.png,3.1,0.4\n")
    for i, n in enumerate("abc"):
        image(kadid / "images" / f"{n}.png", i)
    generic = write(tmp_path / "meta_info_X.csv", "ref_name,dist_name,dmos\nr.png,a.png,0.9\nr.png,b.png,0.2\n"
                    "r.png,c.png,0.5\n")
    # a model whose score rises with the label: CSIQ's DMOS falls as quality rises, so its SRCC must come out -1
    labels = {Path(p).name: v for p, v in zip(paths, [0.0617, 0.289, 0.512])}
    labels.update({"a.png": 4.5, "b.png": 2.0, "c.png": 3.1})

    def sample_answers(model, processor, images, names, prompt, preset, args):
        return [[sampling.Completion(f"\\boxed{{{1 + labels[Path(im.filename).name] / 2:.4f}}}", False)]
                for im in images]
    monkeypatch.setattr(evaluate, "sample_answers", sample_answers)
    monkeypatch.setattr(common, "load_image", lambda p: type("Im", (), {"filename": str(p)})())
    argv = ["--model", tiny_model_dir, "--bench", f"csiq={csiq}", f"kadid={kadid}", f"x={generic}@{kadid / 'images'}",
            "--out", str(tmp_path / "o"), "--max-new-tokens", "4", "--bootstrap", "50"]
    with pytest.warns(UserWarning) as caught:
        summary = evaluate.main(argv)
    unknown = [str(w.message) for w in caught if "direction" in str(w.message)]
    assert len(unknown) == 1 and unknown[0].startswith("x: the direction of its 'dmos' labels is unknown")
    b = json.loads((tmp_path / "o" / "summary.json").read_text())["benchmarks"]
    assert (b["csiq"]["dataset"], b["csiq"]["lower_better"], b["csiq"]["direction_from"]) == ("CSIQ", True, "reader")
    assert (b["kadid"]["dataset"], b["kadid"]["lower_better"]) == ("KADID-10k", False)
    assert "higher is better despite the name" in b["kadid"]["label"] and b["x"]["direction_from"] == "unknown"
    assert summary["benchmarks"]["csiq"]["srcc"] == pytest.approx(-1.0)  # negated DMOS: a rising score is wrong
    assert summary["benchmarks"]["kadid"]["srcc"] == pytest.approx(1.0)
    assert math.isclose(summary["benchmarks"]["x"]["srcc"], 1.0)
    with warnings.catch_warnings(), pytest.raises(SystemExit):
        warnings.simplefilter("ignore")
        evaluate.main(argv + ["--lower-better", "csiq"])
