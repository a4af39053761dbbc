"""Issue 3, the data path: layouts, bad files, the held-out split, leakage and the decode-once cache."""
from __future__ import annotations

import io
import json
import os
import tracemalloc
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from conftest import REAL_DATA, cli, is_mapped
from covidsearch import data

TUTORIAL_FOLDERS = ("COVID-19", "NORMAL", "Viral Pneumonia")


def picture(seed: int, size: int = 48) -> Image.Image:
    """A smooth random grayscale picture: distinct for every seed and, like a real X-ray (unlike the
    noisy demo images), keeps its perceptual hash when re-encoded or brightened."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 6), dtype=np.uint8)
    return Image.fromarray(coarse, "L").resize((size, size), Image.BICUBIC)


def make_classes(root: Path, per_class: int = 20, folders=TUTORIAL_FOLDERS, sub: str = "") -> Path:
    """Write per_class synthetic PNGs into root/<folder>/<sub>/ for each class folder."""
    for c, folder in enumerate(folders):
        target = root / folder / sub
        target.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            picture(1000 * c + i).save(target / f"{i:03d}.png")
    return root


def split_of(dataset: data.Dataset, parts: data.Split) -> dict[str, str]:
    """File name (relative to its dataset root) -> split, as a user reads the manifest."""
    members = (("train", parts.train, dataset), ("val", parts.val, dataset), ("test", parts.test, parts.test_dataset))
    return {ds.samples[i].name: name for name, idx, ds in members for i in idx}


# ---------------------------------------------------------------- layouts


def test_tutorial_layout(xray_dir):
    dataset = data.scan(xray_dir)
    assert dataset.layout == "tutorial"
    assert dataset.classes == ["COVID-19", "Normal", "Viral Pneumonia"]
    assert dataset.counts() == {"COVID-19": 40, "Normal": 40, "Viral Pneumonia": 40}
    assert dataset.skipped == []


def test_kaggle_layout_reads_images_and_ignores_masks(tmp_path):
    release = tmp_path / "COVID-19_Radiography_Dataset"
    make_classes(release, 6, ("COVID", "Normal", "Viral Pneumonia", "Lung_Opacity"), sub="images")
    make_classes(release, 9, ("COVID", "Normal", "Viral Pneumonia", "Lung_Opacity"), sub="masks")
    (release / "COVID.metadata.csv").write_text("FILE NAME,FORMAT\n")

    dataset = data.scan(tmp_path)  # the folder the archive was unpacked into
    assert dataset.layout == "kaggle"
    assert dataset.counts() == {"COVID-19": 6, "Normal": 6, "Viral Pneumonia": 6}
    assert all("/images/" in s.path for s in dataset.samples) and dataset.skipped == []

    four = data.scan(release, classes=["COVID", "Normal", "Viral Pneumonia", "Lung_Opacity"])
    assert four.classes == ["COVID-19", "Normal", "Viral Pneumonia", "Lung_Opacity"]
    assert four.counts()["Lung_Opacity"] == 6


def test_class_folder_aliases_of_both_releases_are_recognised(tmp_path):
    make_classes(tmp_path, 3, ("COVID", "Normal", "Viral Pneumonia"))
    dataset = data.scan(tmp_path)
    assert dataset.classes == ["COVID-19", "Normal", "Viral Pneumonia"]
    assert [s.name for s in dataset.samples][:1] == ["COVID/000.png"]
    assert data.scan(tmp_path, classes=["covid-19", "NORMAL"]).counts() == {"COVID-19": 3, "Normal": 3}


# ---------------------------------------------------------------- image modes


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def palette_image(color: tuple[int, int, int]) -> Image.Image:
    """A mode-P image whose every pixel is palette entry 0."""
    image = Image.new("P", (32, 40), 0)
    image.putpalette([*color, *[0] * 765])
    return image


ORANGE = (200, 100, 50)
MODES = {  # file -> (bytes, expected RGB, expected gray, tolerance)
    "gray.png": (_encoded(Image.new("L", (32, 40), 120), "PNG"), (120, 120, 120), 120, 0),
    "rgb.png": (_encoded(Image.new("RGB", (32, 40), ORANGE), "PNG"), ORANGE, 124, 0),
    "rgba.png": (_encoded(Image.new("RGBA", (32, 40), (*ORANGE, 255)), "PNG"), ORANGE, 124, 0),
    "palette.png": (_encoded(palette_image(ORANGE), "PNG"), ORANGE, 124, 0),
    "white16.png": (_encoded(Image.fromarray(np.full((40, 32), 65535, np.uint16)), "PNG"), (255, 255, 255), 255, 0),
    "mid16.png": (_encoded(Image.fromarray(np.full((40, 32), 32896, np.uint16)), "PNG"), (128, 128, 128), 128, 0),
    "cmyk.jpg": (_encoded(Image.new("CMYK", (32, 40), (0, 0, 0, 0)), "JPEG"), (255, 255, 255), 255, 2),
    "gray.jpg": (_encoded(Image.new("L", (32, 40), 120), "JPEG"), (120, 120, 120), 120, 2),
}


@pytest.mark.parametrize("file", MODES)
def test_every_image_mode_loads_as_8_bit_rgb_or_grayscale(tmp_path, file):
    blob, rgb, gray, tolerance = MODES[file]
    make_classes(tmp_path, 2)
    (tmp_path / "COVID-19" / file).write_bytes(blob)

    dataset = data.scan(tmp_path)
    assert dataset.skipped == []
    i = next(i for i, s in enumerate(dataset.samples) if s.name == f"COVID-19/{file}")
    pixels = data.arrays(dataset, 16, "rgb", tmp_path / "cache")
    assert pixels.shape == (len(dataset.samples), 16, 16, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels[i].astype(int) - rgb).max() <= tolerance
    grays = data.arrays(dataset, 16, "grayscale", tmp_path / "cache")
    assert grays.shape == (len(dataset.samples), 16, 16, 1)
    assert np.abs(grays[i].astype(int) - gray).max() <= tolerance


def test_transparent_pixels_become_black(tmp_path):
    image = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    assert data.decode(_encoded(image, "PNG"), 4).max() == 0


# ---------------------------------------------------------------- bad files


def test_bad_files_are_skipped_and_listed_and_good_files_remain(tmp_path):
    make_classes(tmp_path, 5)
    good = _encoded(picture(7), "PNG")
    bad = {
        "COVID-19/empty.png": b"",
        "COVID-19/truncated.png": good[: len(good) // 2],
        "NORMAL/text.png": b"this is not a PNG",
        "Viral Pneumonia/notes.txt": b"scanned on the portable unit",
    }
    for name, blob in bad.items():
        (tmp_path / name).write_bytes(blob)

    dataset = data.scan(tmp_path)
    assert dataset.counts() == {"COVID-19": 5, "Normal": 5, "Viral Pneumonia": 5}
    reasons = {Path(path).relative_to(tmp_path).as_posix(): reason for path, reason in dataset.skipped}
    assert reasons == {"COVID-19/empty.png": "empty file",
                       "COVID-19/truncated.png": "unreadable image: image file is truncated",
                       "NORMAL/text.png": "not an image",
                       "Viral Pneumonia/notes.txt": "not an image"}


def refuse(monkeypatch: pytest.MonkeyPatch, owner: object, method: str, locked: Path) -> None:
    """Make `owner.method` (Path.read_bytes, os.scandir, ...) refuse `locked` as the OS refuses a user without
    permission (the tests run as root, which may read anything)."""
    real = getattr(owner, method)

    def guarded(path, *args):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args)
    monkeypatch.setattr(owner, method, guarded)


def test_a_file_i_may_not_read_is_skipped_and_listed_and_read_again_once_allowed(tmp_path, monkeypatch):
    make_classes(tmp_path, 3)
    locked = tmp_path / "NORMAL" / "001.png"
    refuse(monkeypatch, Path, "read_bytes", locked)

    dataset = data.scan(tmp_path, cache_dir=tmp_path / "cache")
    assert dataset.skipped == [(str(locked), "cannot read the file: Permission denied")]
    assert dataset.counts() == {"COVID-19": 3, "Normal": 2, "Viral Pneumonia": 3}
    monkeypatch.undo()  # the user fixes the permissions: size and mtime stay the same
    assert data.scan(tmp_path, cache_dir=tmp_path / "cache").skipped == []


@pytest.mark.parametrize("folder", ["NORMAL", ""])
def test_a_folder_i_may_not_read_is_a_one_line_error_naming_it(tmp_path, monkeypatch, folder):
    make_classes(tmp_path, 3)
    locked = tmp_path / folder  # a class folder, or the data folder itself
    for owner, listing in ((Path, "iterdir"), (os, "scandir")):  # every way to list it
        refuse(monkeypatch, owner, listing, locked)
    with pytest.raises(data.DataError) as err:
        data.scan(tmp_path)
    assert str(err.value) == f"cannot read folder {locked}: Permission denied"


def test_images_smaller_than_the_minimum_side_are_skipped_and_listed(tmp_path):
    make_classes(tmp_path, 3)
    side = data.MIN_IMAGE_SIDE
    picture(1, size=1).save(tmp_path / "NORMAL" / "dot.png")
    Image.new("L", (side, side - 1), 100).save(tmp_path / "NORMAL" / "strip.png")
    picture(2, size=side).save(tmp_path / "NORMAL" / "smallest.png")

    dataset = data.scan(tmp_path)
    reasons = {Path(path).relative_to(tmp_path).as_posix(): reason for path, reason in dataset.skipped}
    assert reasons == {"NORMAL/dot.png": "image is 1x1 px; images smaller than 32 px on a side are skipped",
                       "NORMAL/strip.png": "image is 32x31 px; images smaller than 32 px on a side are skipped"}
    assert "NORMAL/smallest.png" in [s.name for s in dataset.samples]


def test_broken_links_and_link_loops_are_skipped_and_listed(tmp_path):
    make_classes(tmp_path, 3)
    normal = tmp_path / "NORMAL"
    (normal / "moved.png").symlink_to("deleted.png")
    (normal / "a.png").symlink_to("b.png")
    (normal / "b.png").symlink_to("a.png")
    (normal / "again").symlink_to(normal, target_is_directory=True)  # a recursive walk would never end
    (normal / "up").symlink_to(tmp_path, target_is_directory=True)
    (normal / "linked.png").symlink_to(normal / "000.png")  # a link to an image is that image

    dataset = data.scan(tmp_path)
    reasons = {Path(path).relative_to(tmp_path).as_posix(): reason for path, reason in dataset.skipped}
    circle = "symlink loop: the links lead round in a circle, never to a file"
    assert reasons == {"NORMAL/moved.png": "broken symlink: deleted.png does not exist",
                       "NORMAL/a.png": circle, "NORMAL/b.png": circle,
                       "NORMAL/again": f"symlink loop: leads back to {normal.resolve()}, a folder that contains it",
                       "NORMAL/up": f"symlink loop: leads back to {tmp_path.resolve()}, a folder that contains it"}
    assert "NORMAL/linked.png" in [s.name for s in dataset.samples]


def test_skipped_lines_give_the_count_the_first_few_files_and_where_all_are_listed(tmp_path):
    make_classes(tmp_path, 3)
    for i in range(7):
        (tmp_path / "NORMAL" / f"empty-{i}.png").write_bytes(b"")
    dataset = data.scan(tmp_path)
    listed = "search/skipped_files.csv"

    assert data.skipped_lines(dataset, listed, shown=2) == [
        "skipped 7 file(s) that cannot be used, all listed in search/skipped_files.csv:",
        "  NORMAL/empty-0.png: empty file",
        "  NORMAL/empty-1.png: empty file",
        "  ... and 5 more",
    ]
    assert len(data.skipped_lines(dataset, listed)) == 1 + 5 + 1
    assert len(data.skipped_lines(dataset, listed, shown=7)) == 1 + 7  # all shown: no "more" line
    assert data.skipped_lines(data.scan(make_classes(tmp_path / "clean", 3)), listed) == []


def test_every_file_is_checked_once(tmp_path, monkeypatch):
    make_classes(tmp_path, 4)
    checked = []
    real_check = data._check_file
    monkeypatch.setattr(data, "_check_file", lambda path, *args: checked.append(path) or real_check(path, *args))
    first = data.scan(tmp_path, cache_dir=tmp_path / "cache")
    again = data.scan(tmp_path, cache_dir=tmp_path / "cache")
    assert len(checked) == 12 and again.samples == first.samples


def test_a_scan_index_of_an_older_hash_is_checked_again(tmp_path):
    """Difference hashes of two versions do not compare: files an older covidsearch indexed are hashed anew."""
    make_classes(tmp_path / "data", 4)
    first = data.scan(tmp_path / "data", cache_dir=tmp_path / "cache")
    keys = data._file_keys([Path(s.path) for s in first.samples])
    older = {keys[Path(s.path)]: [s.sha256, "0" * 64, s.gray] for s in first.samples}
    (tmp_path / "cache" / "scan.json").write_text(json.dumps(older))  # the first version's index: file key -> result

    again = data.scan(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert again.samples == first.samples
    assert all(s.dhash == data._dhash(Image.open(s.path).convert("L")) for s in again.samples)


def test_dataset_problems_are_one_line_errors(tmp_path):
    make_classes(tmp_path, 3, ("COVID-19", "NORMAL"))
    (tmp_path / "Viral Pneumonia").mkdir()
    (tmp_path / "Viral Pneumonia" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    problems = {
        "data directory not found": lambda: data.scan(tmp_path / "nowhere"),
        "class 'Viral Pneumonia' has no readable image": lambda: data.scan(tmp_path),
        "need at least two classes": lambda: data.scan(tmp_path, classes=["COVID-19"]),
        "class folder for 'Lung_Opacity' not found": lambda: data.scan(tmp_path, classes=["Normal", "Lung_Opacity"]),
        "a class is given twice": lambda: data.scan(tmp_path, classes=["COVID", "COVID-19"]),
    }
    for message, call in problems.items():
        with pytest.raises(data.DataError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_cli_reports_a_missing_data_directory_in_one_line(workdir):
    result = cli("run", "--data", str(workdir / "nowhere"), cwd=workdir, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("covidsearch:")]
    assert errors == [f"covidsearch: error: data directory not found: {workdir / 'nowhere'}"]


# ---------------------------------------------------------------- split


def test_same_seed_same_split_wherever_the_dataset_lives(xray_dir, tmp_path):
    def split_names(root, seed):
        dataset = data.scan(root)
        return split_of(dataset, data.split(dataset, seed, test_per_class=8))

    copy = shutil.copytree(xray_dir, tmp_path / "elsewhere" / "copy")
    assert split_names(xray_dir, 5) == split_names(copy, 5) == split_names(xray_dir, 5)
    assert split_names(xray_dir, 5) != split_names(xray_dir, 6)


def test_split_is_stratified_with_test_per_class_held_out(xray_dir):
    dataset = data.scan(xray_dir)
    parts = data.split(dataset, 28, val_fraction=0.2, test_per_class=8)
    labels = dataset.labels
    assert np.bincount(labels[parts.test]).tolist() == [8, 8, 8]
    assert np.bincount(labels[parts.val]).tolist() == [6, 6, 6]  # 20% of the 32 left per class
    assert np.bincount(labels[parts.train]).tolist() == [26, 26, 26]
    assert sorted(np.concatenate([parts.train, parts.val, parts.test]).tolist()) == list(range(120))


def test_manifest_lists_every_image_with_its_split_and_hash(xray_dir, tmp_path):
    dataset = data.scan(xray_dir)
    parts = data.split(dataset, 28, test_per_class=8)
    data.write_csv(data.manifest_rows(dataset, parts), tmp_path / "manifest.csv")
    lines = (tmp_path / "manifest.csv").read_text().splitlines()
    assert lines[0] == "file,class,split,sha256" and len(lines) == 121
    assert sum(",test," in line for line in lines) == 24


def test_too_small_a_class_is_a_one_line_error(xray_dir):
    with pytest.raises(data.DataError, match="too few"):
        data.split(data.scan(xray_dir), 28, test_per_class=40)


def separate_test_set(tmp_path: Path) -> tuple[Path, Path]:
    """A training folder and a --test-data folder with one held-out image per class."""
    train_root = make_classes(tmp_path / "train", 10)
    test_root = tmp_path / "test"
    for c, folder in enumerate(TUTORIAL_FOLDERS):
        (test_root / folder).mkdir(parents=True)
        picture(500 + c).save(test_root / folder / "held-out.png")
    return train_root, test_root


def test_test_data_images_and_their_copies_never_train(tmp_path):
    train_root, test_root = separate_test_set(tmp_path)
    shutil.copy(test_root / "NORMAL" / "held-out.png", train_root / "NORMAL" / "copied-by-mistake.png")

    dataset = data.scan(train_root)
    test_dataset = data.scan(test_root, dataset.classes)
    parts = data.split(dataset, 28, test_dataset=test_dataset)
    assert len(parts.test) == 3 and parts.test_dataset is test_dataset
    used = {dataset.samples[i].sha256 for i in np.concatenate([parts.train, parts.val])}
    assert used.isdisjoint(s.sha256 for s in test_dataset.samples)
    assert [dataset.samples[i].name for i in parts.excluded] == ["NORMAL/copied-by-mistake.png"]
    rows = data.manifest_rows(dataset, parts)
    assert {r["split"] for r in rows if r["file"].endswith("copied-by-mistake.png")} == {"excluded"}


# ---------------------------------------------------------------- leakage


def near_copy(image: Image.Image) -> bytes:
    """The same X-ray brightened by 5% and re-encoded as JPEG: a typical near-duplicate."""
    buf = io.BytesIO()
    ImageEnhance.Brightness(image).enhance(1.05).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_leakage_check_finds_exact_and_near_duplicates_across_splits(tmp_path):
    make_classes(tmp_path, 6)
    shutil.copy(tmp_path / "COVID-19" / "000.png", tmp_path / "NORMAL" / "same-file.png")
    (tmp_path / "Viral Pneumonia" / "brighter.jpg").write_bytes(near_copy(picture(2000)))  # Viral Pneumonia/000.png
    dataset = data.scan(tmp_path)
    index = {s.name: i for i, s in enumerate(dataset.samples)}
    test = [index["NORMAL/same-file.png"], index["Viral Pneumonia/brighter.jpg"]]
    parts = data.Split(train=np.array([i for i in range(len(dataset.samples)) if i not in test]), val=np.array([]),
                       test=np.array(test), test_dataset=dataset)

    found = data.leakage(dataset, parts)
    assert found["exact_duplicates"] == 1 and found["near_duplicates"] == 1
    assert Path(found["exact"][0]["a"]).name == "000.png" and found["exact"][0]["splits"] == "train/test"
    assert found["near"][0]["a"].endswith("Viral Pneumonia/000.png")
    assert found["near"][0]["bits"] <= data.NEAR_DUPLICATE_BITS


def test_dedupe_with_test_data_also_keeps_near_copies_of_test_images_out(tmp_path):
    train_root, test_root = separate_test_set(tmp_path)
    (train_root / "NORMAL" / "brighter.jpg").write_bytes(near_copy(Image.open(test_root / "NORMAL" / "held-out.png")))
    dataset = data.scan(train_root)
    test_dataset = data.scan(test_root, dataset.classes)

    plain = data.split(dataset, 28, test_dataset=test_dataset)
    assert [Path(pair["a"]).name for pair in data.leakage(dataset, plain)["near"]] == ["brighter.jpg"]
    deduped = data.split(dataset, 28, test_dataset=test_dataset, dedupe=True)
    assert data.leakage(dataset, deduped)["near_duplicates"] == 0
    assert [dataset.samples[i].name for i in deduped.excluded] == ["NORMAL/brighter.jpg"]


def test_distinct_images_are_not_near_duplicates(xray_dir):
    dataset = data.scan(xray_dir)
    assert data.duplicate_groups(dataset.samples) == []


def test_dedupe_keeps_each_group_of_duplicates_in_one_split(tmp_path):
    make_classes(tmp_path, 20)
    for i in range(8):  # copies of Normal images: 4 exact, 4 brightened and re-encoded
        original = tmp_path / "NORMAL" / f"{i:03d}.png"
        if i < 4:
            shutil.copy(original, tmp_path / "COVID-19" / f"copy-{i}.png")
        else:
            (tmp_path / "NORMAL" / f"copy-{i}.jpg").write_bytes(near_copy(Image.open(original)))
    dataset = data.scan(tmp_path)
    groups = data.duplicate_groups(dataset.samples)
    assert sorted(len(g) for g in groups) == [2] * 8

    leaky = data.leakage(dataset, data.split(dataset, 28, test_per_class=4))
    assert leaky["exact_duplicates"] + leaky["near_duplicates"] > 0
    parts = data.split(dataset, 28, test_per_class=4, dedupe=True)
    clean = data.leakage(dataset, parts)
    assert clean["exact_duplicates"] == clean["near_duplicates"] == 0
    where = split_of(dataset, parts)
    for group in groups:
        assert len({where[dataset.samples[i].name] for i in group}) == 1


# ---------------------------------------------------------------- pixel cache


def test_images_are_decoded_once_per_size_and_then_read_from_the_cache(xray_dir, tmp_path, monkeypatch):
    dataset = data.scan(xray_dir)
    decoded = []
    real_decode = data.decode
    monkeypatch.setattr(data, "decode", lambda *args: decoded.append(args) or real_decode(*args))

    first = data.arrays(dataset, 32, "rgb", tmp_path)
    assert len(decoded) == 120 and first.shape == (120, 32, 32, 3) and first.dtype == np.uint8
    again = data.arrays(dataset, 32, "rgb", tmp_path)
    assert len(decoded) == 120 and np.array_equal(first, again)

    moved = data.scan(shutil.copytree(xray_dir, tmp_path / "moved"))  # same contents elsewhere: still cached
    assert np.array_equal(data.arrays(moved, 32, "rgb", tmp_path), first) and len(decoded) == 120
    data.arrays(dataset, 50, "rgb", tmp_path)
    assert len(decoded) == 240  # a new size decodes once more
    data.arrays(dataset, 32, "grayscale", tmp_path)
    assert len(decoded) == 240  # grayscale files: their RGB pixels were read from their grayscale ones


def test_images_added_later_are_the_only_ones_decoded(tmp_path, monkeypatch):
    make_classes(tmp_path / "data", 4)
    data.arrays(data.scan(tmp_path / "data"), 24, "rgb", tmp_path / "cache")
    picture(99).save(tmp_path / "data" / "NORMAL" / "new.png")
    decoded = []
    real_decode = data.decode
    monkeypatch.setattr(data, "decode", lambda *args: decoded.append(args) or real_decode(*args))
    data.arrays(data.scan(tmp_path / "data"), 24, "rgb", tmp_path / "cache")
    assert [Path(args[0]).name for args in decoded] == ["new.png"]


def test_scan_can_fill_the_cache_with_the_same_decode_that_checks_each_file(xray_dir, tmp_path, monkeypatch):
    dataset = data.scan(xray_dir, cache_dir=tmp_path, sizes=[(50, "rgb")])
    monkeypatch.setattr(data, "decode", lambda *args: pytest.fail("decoded again"))
    pixels = data.arrays(dataset, 50, "rgb", tmp_path)
    assert pixels.shape == (120, 50, 50, 3)
    assert pixels.dtype == np.uint8 and 30 < pixels.mean() < 225


def test_grayscale_files_are_cached_in_one_channel_and_read_as_the_same_rgb_pixels(tmp_path, monkeypatch):
    """X-rays are grayscale files: keeping their RGB pixels in three equal channels would write and read three
    times the bytes (5.7 GB instead of 1.9 at 299 px for the full release). A colour file among them keeps its
    three channels."""
    root = make_classes(tmp_path / "data", per_class=10)
    colour = np.stack([np.asarray(picture(7)), np.asarray(picture(8)), np.asarray(picture(9))], axis=-1)
    Image.fromarray(colour, "RGB").save(root / "NORMAL" / "colour.png")
    dataset = data.scan(root, cache_dir=tmp_path / "cache", sizes=[(40, "rgb")])
    monkeypatch.setattr(data, "decode", lambda *args: pytest.fail("decoded again"))

    pixels = data.arrays(dataset, 40, "rgb", tmp_path / "cache")

    assert pixels.shape == (31, 40, 40, 3)
    for i, sample in enumerate(dataset.samples):
        with Image.open(sample.path) as im:
            assert np.array_equal(pixels[i], data.resize(im, 40, "rgb")), sample.name
    assert [s.name for s in dataset.samples if not s.gray] == ["NORMAL/colour.png"]
    kept = {folder.name: sum(np.load(f, mmap_mode="r").shape[0] for f in folder.glob("*.npy"))
            for folder in (tmp_path / "cache" / "pixels").iterdir()}
    assert kept == {"40px-grayscale": 30, "40px-rgb": 1}
    gray_only = data.Dataset(dataset.root, dataset.layout, dataset.classes, [s for s in dataset.samples if s.gray])
    mapped = data.arrays(gray_only, 40, "rgb", tmp_path / "cache")
    assert mapped.strides[-1] == 0  # one channel read as three, not copied
    assert np.array_equal(mapped, pixels[[i for i, s in enumerate(dataset.samples) if s.gray]])
    batch = data.Rows(mapped, np.arange(5, 30))[np.array([4, 0, 4])]  # as a trial reads its batches
    assert batch.flags.c_contiguous and np.array_equal(batch, np.asarray(mapped)[[9, 5, 9]])


FILL = """
import sys
from covidsearch import data
pixels = data.arrays(data.scan(sys.argv[1]), 40, "rgb", sys.argv[2])
print(int(pixels.astype("int64").sum()))
"""


def test_two_processes_filling_the_cache_at_once_leave_one_valid_pack(xray_dir, tmp_path):
    cache = tmp_path / "cache"
    fillers = [subprocess.Popen([sys.executable, "-c", FILL, str(xray_dir), str(cache)], stdout=subprocess.PIPE,
                                text=True) for _ in range(2)]
    sums = [int(p.communicate(timeout=120)[0]) for p in fillers]
    assert [p.returncode for p in fillers] == [0, 0]
    store = cache / "pixels" / "40px-grayscale"  # the images are grayscale: kept in one channel
    pack = next(store.glob("*.npy")).stem
    assert sorted(p.name for p in store.iterdir()) == [f"{pack}.npy", f"{pack}.sha", "fill.lock"]
    assert sums[0] == sums[1] == int(data.arrays(data.scan(xray_dir), 40, "rgb", cache).astype("int64").sum())


# ---------------------------------------------------------------- the real data


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real data not on this machine")
def test_real_data_scans_clean():
    dataset = data.scan(REAL_DATA)
    assert dataset.counts() == {"COVID-19": 600, "Normal": 1200, "Viral Pneumonia": 1000}
    assert dataset.skipped == []
    parts = data.split(dataset, 28)
    assert np.bincount(dataset.labels[parts.test]).tolist() == [40, 40, 40]
    leaks = data.leakage(dataset, parts)
    assert leaks["exact_duplicates"] == leaks["near_duplicates"] == 0  # no two images within 8 bits


def test_the_scan_fills_the_cache_row_by_row_without_holding_the_pixels_and_shows_progress(tmp_path):
    root = make_classes(tmp_path / "data", per_class=100)
    (root / "NORMAL" / "broken.png").write_bytes(b"not a png")  # its row is left out of the pack
    seen = []
    tracemalloc.start()  # numpy's allocations are traced: the pixels held at once would show in full
    dataset = data.scan(root, cache_dir=tmp_path / "cache", sizes=[(128, "rgb")],
                        report=lambda done, total: seen.append((done, total)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    pack_bytes = 300 * 128 * 128 * 3
    assert peak < pack_bytes / 3, f"{peak} bytes allocated to fill a {pack_bytes}-byte pack"
    assert seen == [(done, 301) for done in range(1, 302)]
    pixels = data.arrays(dataset, 128, "rgb", tmp_path / "cache")
    assert pixels.shape == (300, 128, 128, 3) and is_mapped(pixels)  # the scan's own pack, mapped
    for i in (0, 150, 299):
        assert np.array_equal(pixels[i], data.decode(dataset.samples[i].path, 128, "rgb"))
    assert not list((tmp_path / "cache").rglob("filling.*"))
