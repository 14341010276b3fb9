"""Captions files as users really have them, written here as real files: paths leading outside --images, Excel's
UTF-8 with a byte-order mark and ';' separators, Latin-1 and UTF-16 files, very long captions, quotes that never
close, malformed JSONL lines."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil

import pytest

from towerlab.cli import main
from towerlab.config import ConfigError
from towerlab.data.captions import read_captions
from towerlab.data.folder import prepare_images
from towerlab.data.pipeline import split_columns


def _image_hashes(m) -> set[str]:
    return {hashlib.sha256(b).hexdigest() for s in ("train", "heldout")
            for b in split_columns(m, s, ["image"])["image"]}


def test_paths_outside_images_are_refused(image_folder, tmp_path):
    src = image_folder
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    shutil.copy(src["images"] / "img001.png", secret)
    with open(secret, "ab") as f:
        f.write(b"private")  # other bytes than any image inside, so its hash would show if it leaked into a shard
    os.symlink(secret, src["images"] / "link.png")  # inside the folder, pointing out of it
    os.symlink(src["images"] / "img003.png", src["images"] / "alias.png")  # pointing inside: fine
    with open(src["csv"], "a") as f:
        f.write("../outside/secret.png,dot dot,,red\n")  # line 42
        f.write(f"{secret},absolute,,red\n")
        f.write("link.png,a symlink out,,red\n")
        f.write("alias.png,a symlink in,,green\n")
        f.write(f"{src['images'] / 'img005.png'},absolute but inside,,green\n")
    m, r = prepare_images(src["images"], src["csv"], tmp_path / "out", shard_size=10)
    assert r.problems["outside --images"] == 3 and r.valid == 42
    assert r.examples[:3] == ["captions.csv line 42: outside --images (../outside/secret.png)",
                              f"captions.csv line 43: outside --images ({secret})",
                              "captions.csv line 44: outside --images (link.png)"]
    assert hashlib.sha256(secret.read_bytes()).hexdigest() not in _image_hashes(m)
    assert m.data["report"]["problems"]["outside --images"] == 3
    with pytest.raises(ConfigError, match=r"3 bad record\(s\).*line 42: outside --images \(../outside/secret.png\)"):
        prepare_images(src["images"], src["csv"], tmp_path / "strict", strict=True)


def test_excel_csv_with_bom_crlf_and_semicolons(image_folder, tmp_path):
    src = image_folder
    rows = [("img000.jpg", "un café crème", "red"), ("img001.png", "naïve \"quoted\", with a comma", "green"),
            ("img002.jpg", "straße", "blue")]
    for delimiter in (",", ";"):
        path = tmp_path / f"excel{delimiter == ';'}.csv"
        with open(path, "w", encoding="utf-8-sig", newline="") as f:  # what Excel's "CSV UTF-8" writes
            w = csv.writer(f, delimiter=delimiter)  # csv's default line ending is \r\n, as Excel's
            w.writerow(["image", "caption", "label"])
            w.writerows(rows)
        assert path.read_bytes().startswith(b"\xef\xbb\xbfimage")
        entries = read_captions(path)
        assert [(e.image, e.captions, e.label, e.line) for e in entries] == [
            (img, [cap], label, i) for i, (img, cap, label) in enumerate(rows, 2)]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_text('{"image": "img000.jpg", "caption": "un café"}\n', encoding="utf-8-sig")
    assert read_captions(jsonl)[0].captions == ["un café"]


def test_latin1_and_utf16_are_one_clear_error(image_folder, tmp_path, capsys):
    src = image_folder
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image,caption\nimg000.jpg,plain\nimg001.png,un café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.csv line 3: not UTF-8 \(byte 0xe9 at column 18.*re-save the file "
                                          "as UTF-8"):
        read_captions(latin)
    assert main(["data", "prepare", "images", "--images", str(src["images"]), "--captions", str(latin), "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "line 3: not UTF-8" in err[0]
    assert not (tmp_path / "out").exists()
    utf16 = tmp_path / "unicode.csv"
    utf16.write_text("image,caption\nimg000.jpg,x\n", encoding="utf-16")
    with pytest.raises(ConfigError, match="unicode.csv line 1: the file is UTF-16.*re-save it as UTF-8"):
        read_captions(utf16)
    jsonl = tmp_path / "latin.jsonl"
    jsonl.write_bytes('{"image": "img000.jpg", "caption": "ok"}\n{"image": "img001.png", "caption": "café"}\n'
                      .encode("cp1252"))
    with pytest.raises(ConfigError, match="latin.jsonl line 2: not UTF-8"):
        read_captions(jsonl)


def test_very_long_caption(image_folder, tmp_path):
    src = image_folder
    long = "word " * 60_000  # 300,000 characters: over csv's default field limit of 131,072
    path = tmp_path / "long.csv"
    path.write_text(f'image,caption\nimg000.jpg,"{long}"\nimg001.png,short\n')
    limit = csv.field_size_limit()
    entries = read_captions(path)
    assert entries[0].captions == [long.strip()] and entries[1].captions == ["short"] and entries[1].line == 3
    assert csv.field_size_limit() == limit  # the module-wide limit is left as it was
    m, r = prepare_images(src["images"], path, tmp_path / "out", heldout=0)
    assert r.valid == 2 and split_columns(m, "train", ["caption"])["caption"][0] == long.strip()


@pytest.mark.parametrize("later", [
    "img002.jpg,plain\nimg003.png,also plain\n",  # today: every later row silently merged into one caption
    'img002.jpg,plain\nimg003.png,"quoted"\nimg004.jpg,x\n',  # the next quote closes it in the wrong place
])
def test_unterminated_quote_names_the_line_it_opened(image_folder, tmp_path, later):
    path = tmp_path / "quote.csv"
    path.write_text('image,caption\nimg000.jpg,fine\nimg001.png,"never closed\n' + later)
    with pytest.raises(ConfigError, match=r"quote.csv line 3: a quoted field that starts on this line is not closed"):
        read_captions(path)
    with pytest.raises(ConfigError, match="line 3: a quoted field"):
        prepare_images(image_folder["images"], path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quoted_newline_is_still_one_caption(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('image,caption\nimg000.jpg,"two\nlines"\nimg001.png,next\n')
    entries = read_captions(path)
    assert [(e.image, e.captions, e.line) for e in entries] == [("img000.jpg", ["two lines"], 2),
                                                               ("img001.png", ["next"], 4)]


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"image": "a.png", "caption": "ok"}\n\n{"image": "b.png", "caption": "unterminated}\n'
                    '{"image": "c.png", "caption": "ok"}\n')
    with pytest.raises(ConfigError, match=r"caps.jsonl line 3: not JSON \(Unterminated string.*one object per line"):
        read_captions(path)
    path.write_text('{"image": "a.png", "caption": "ok"}\n{"image": ["a.png"], "caption": "x"}\n')
    with pytest.raises(ConfigError, match="caps.jsonl line 2: expected an object with an 'image' key"):
        read_captions(path)
    path.write_text('{"image": "a.png", "captions": [{"text": "x"}]}\n')
    with pytest.raises(ConfigError, match="line 1: 'captions' must be a string or a list of strings"):
        read_captions(path)


def test_unquoted_separator_in_caption(tmp_path):
    path = tmp_path / "commas.csv"
    path.write_text("image,caption,label\nimg000.jpg,a dog,red\nimg001.png,a cat, sleeping,green\nimg002.jpg,x,blue,\n")
    with pytest.raises(ConfigError, match="commas.csv line 3: 4 fields but the header has 3: put a caption that "
                                          "contains ',' in double quotes"):
        read_captions(path)
    path.write_text("image,caption,label\nimg000.jpg,a dog,red,\n")  # an empty trailing field is harmless
    assert read_captions(path)[0].captions == ["a dog"]
