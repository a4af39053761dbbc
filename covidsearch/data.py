"""Dataset discovery, file checks, the held-out split, leakage check and the decode-once cache.

Flow: scan(root) finds class folders in either published layout and checks every file once;
split() makes the deterministic stratified train/validation/test split; leakage() finds
duplicates across splits; arrays() returns uint8 pixels from an on-disk cache so that no
epoch ever decodes a PNG again.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from . import UserError

ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_CLASSES = ("COVID-19", "Normal", "Viral Pneumonia")
COVID = DEFAULT_CLASSES[0]  # the class an operating-point threshold is about (operating.py)
# Folder names used by the tutorial's copy and by the current Kaggle release.
CLASS_ALIASES = {
    "COVID-19": ("COVID-19", "COVID"),
    "Normal": ("NORMAL", "Normal"),
    "Viral Pneumonia": ("Viral Pneumonia",),
    "Lung_Opacity": ("Lung_Opacity", "Lung Opacity"),
}
# Hamming distance on the 256-bit difference hash. On the real 2,800 images no two distinct
# X-rays are closer than 10 bits (the closest pairs are different patients), while re-encoded,
# brightened, contrast- or gamma-adjusted, resized, blurred or text-stamped copies stay within
# 8 bits in 94-100% of cases: 8 keeps a margin below the first false match. See
# benchmarks/RESULTS.md.
NEAR_DUPLICATE_BITS = 8
DHASH_VERSION = 2  # the scan index keeps this version's difference hashes; 1 resized every pixel fairly (no key)
# Images smaller than this on either side are skipped: a thumbnail or an icon is not an X-ray, and upscaling one to the
# model's input size would train on blur.
MIN_IMAGE_SIDE = 32
# Where the search run records every skipped file (the console shows the first few).
# The reason given for a file the scan could not open; such results are not remembered, so a fix shows next scan.
CANNOT_READ = "cannot read the file"
SPLITS = ("train", "val", "test")
T = TypeVar("T")
R = TypeVar("R")
Size = tuple[int, str]  # (input size in pixels, colour mode): one folder of the pixel cache


class DataError(UserError, ValueError):
    """A dataset problem the user must fix; its message is shown as the one-line error."""


@dataclass(frozen=True)
class Sample:
    """One readable image: where it is, its class index and the hashes that identify it."""

    path: str
    label: int
    sha256: str
    dhash: str  # 256-bit difference hash, hex
    name: str = ""  # path relative to the dataset root: the same wherever the dataset lives
    gray: bool = False  # a single-band file: its RGB pixels are its grayscale ones widened, and cached as those


@dataclass
class Dataset:
    """The readable images of a dataset root plus what was skipped, in a stable order."""

    root: str
    layout: str
    classes: list[str]
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        """Images per class, for summaries and class weights."""
        labels = self.labels
        return {c: int((labels == i).sum()) for i, c in enumerate(self.classes)}

    def fingerprint(self) -> str:
        """Content fingerprint: the same images with the same labels give the same value anywhere."""
        h = hashlib.sha256()
        for s in sorted(self.samples, key=lambda s: (s.label, s.sha256)):
            h.update(f"{self.classes[s.label]}:{s.sha256}\n".encode())
        return h.hexdigest()


@dataclass
class Split:
    """Indices into Dataset.samples for each split (test may index a separate test dataset).

    `excluded` holds training-set images kept out of every split because they copy a test image.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_dataset: Dataset
    excluded: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int64))

    def members(self, dataset: Dataset) -> list[tuple[str, np.ndarray, Dataset]]:
        """(name, indices, the dataset they index) of each of SPLITS: test may index the separate test dataset."""
        return list(zip(SPLITS, (self.train, self.val, self.test), (dataset, dataset, self.test_dataset)))


def metric_safe(name: str) -> str:
    """Class name as it appears in metric names, e.g. 'COVID-19' -> 'covid_19'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


Report = Callable[[int, int], None]  # told (done, total) as a long job goes, to show progress


def _parallel(fn: Callable[[T], R], items: list[T], workers: int | None, report: Report | None = None) -> list[R]:
    """Map over threads: Pillow, hashlib and file reads release the GIL, and threads never
    fork a process that already runs TensorFlow (which can deadlock)."""
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        results = []
        for result in pool.map(fn, items):
            results.append(result)
            if report:
                report(len(results), len(items))
        return results


# ---------------------------------------------------------------- scanning


def _class_dir(root: Path, name: str) -> tuple[Path, str] | None:
    """Find a class's image folder in the tutorial layout or the Kaggle layout (images/, not masks/)."""
    for alias in CLASS_ALIASES.get(name, (name,)):
        for base in (root, *(Path(e.path) for e in _entries(root) if e.is_dir())):
            candidate = base / alias
            if (candidate / "images").is_dir():
                return candidate / "images", "kaggle"
            if candidate.is_dir():
                return candidate, "tutorial"
    return None


def _entries(folder: Path) -> list[os.DirEntry]:
    """A folder's entries in a stable order (by name), each with its type from the listing (no call to the file
    system per entry, for the release's 21,165 files), or a one-line error naming the folder that cannot be read."""
    try:
        with os.scandir(folder) as listing:
            return sorted(listing, key=lambda e: e.name)
    except OSError as err:
        raise DataError(f"cannot read folder {folder}: {err.strerror or err}") from None


def _link_problem(link: Path, folder: Path) -> str | None:
    """Why a symbolic link in a class folder cannot be used, or None when it leads to a file or an unrelated folder."""
    try:
        link.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop: the links lead round in a circle, never to a file"
        if err.errno == errno.ENOENT:
            return f"broken symlink: {os.readlink(link)} does not exist"
        return f"cannot follow symlink: {err.strerror or err}"
    target = link.resolve()
    if target.is_dir() and (target == folder.resolve() or target in folder.resolve().parents):
        return f"symlink loop: leads back to {target}, a folder that contains it"
    return None


def _folder_files(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """A class folder's files, and its symbolic links that lead nowhere usable with why; subfolders are not scanned,
    so a link back up the tree cannot make the scan loop."""
    files, skipped = [], []
    for entry in _entries(folder):
        p = Path(entry.path)
        problem = _link_problem(p, folder) if entry.is_symlink() else None
        if problem:
            skipped.append((str(p), problem))
        elif entry.is_file():
            files.append(p)
    return files, skipped


def _canonical(name: str) -> str:
    """Map a folder name or alias given by the user to the canonical class name."""
    for canonical, aliases in CLASS_ALIASES.items():
        if name.lower() in (a.lower() for a in (canonical, *aliases)):
            return canonical
    return name


def _class_names(classes: Iterable[str] | None) -> list[str]:
    """The canonical class names asked for; two or more distinct ones, or a one-line error."""
    names = [_canonical(c) for c in (classes or DEFAULT_CLASSES)]
    if len(set(names)) != len(names):
        raise DataError(f"a class is given twice: {names}")
    if len(names) < 2:
        raise DataError(f"need at least two classes, got {names}")
    return names


def _check_file(path: str, sizes: tuple[Size, ...] = ()) -> tuple[str | None, str, bool, dict[Size, np.ndarray]]:
    """Decode a file fully once; return (sha256, dhash, whether it is single-band, its pixels at each of `sizes` as
    the cache keeps them: _kept(size, mode)) or (None, why it cannot be used, False, {})."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:  # permission denied, an I/O error, a file removed during the scan
        return None, f"{CANNOT_READ}: {err.strerror or err}", False, {}
    if not data:
        return None, "empty file", False, {}
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if min(im.size) < MIN_IMAGE_SIDE:
                return None, _too_small(im.size), False, {}
            gray = to_mode(im, "grayscale")
            single = _single_band(im)
            kept = {_kept(size, mode, single) for size, mode in sizes}
            pixels = {key: _pixels(im, *key) for key in kept}
    except UnidentifiedImageError:
        return None, "not an image", False, {}
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return None, f"unreadable image: {err}".splitlines()[0], False, {}
    return hashlib.sha256(data).hexdigest(), _dhash(gray), single, pixels


def _too_small(size: tuple[int, int]) -> str:
    """The reason an image below MIN_IMAGE_SIDE is skipped, with its size."""
    return f"image is {size[0]}x{size[1]} px; images smaller than {MIN_IMAGE_SIDE} px on a side are skipped"


def _dhash(gray: Image.Image) -> str:
    """256-bit difference hash, robust to resizing and re-encoding, for near-duplicate search. The image is averaged
    by whole blocks to at least four times the 17 x 16 grid before the fair bilinear resize (Pillow's reducing_gap):
    resizing every pixel fairly cost the scan more than its SHA-256 and its pixel cache together."""
    small = np.asarray(gray.resize((17, 16), Image.BILINEAR, reducing_gap=4.0), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return np.packbits(bits).tobytes().hex()


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], object]) -> None:
    """Write through a temp file and rename, so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _file_keys(files: list[Path]) -> dict[Path, str]:
    """Scan-cache keys: a file replaced or edited in place gets a new key and is checked again. A file's real path
    is its folder's, resolved once, and its name (as text: a Path per file costs more than its lstat); only a
    symbolic link is resolved on its own."""
    folders: dict[str, str] = {}
    keys = {}
    for path in files:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            st, real = os.stat(path), os.path.realpath(path)
        else:
            folder, name = os.path.split(path)
            if folder not in folders:
                folders[folder] = os.path.realpath(folder)
            real = os.path.join(folders[folder], name)
        keys[path] = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    return keys


def _checked(files: list[Path], cache_dir: Path | None, workers: int | None, sizes: tuple[Size, ...],
             report: Report | None = None) -> dict[Path, tuple[str | None, str, bool]]:
    """Check results per file (sha256 or None, dhash or why not, single-band); files seen before (same path, size
    and mtime) are not read again, and the decode that checks a new file also fills the pixel cache for `sizes`."""
    index = cache_dir / "scan.json" if cache_dir else None
    known = _read_index(index)
    keys = _file_keys(files)
    todo = [p for p in files if keys[p] not in known]
    kept = {_kept(size, mode, single) for size, mode in sizes for single in (False, True)} if cache_dir and todo else ()
    packs = {key: _Pack(_store(cache_dir, *key), len(todo), *key) for key in kept}

    def check(item: tuple[int, Path]) -> tuple[str | None, str, bool]:
        row, path = item
        sha, extra, single, pixels = _check_file(str(path), sizes if packs else ())
        for key, image in pixels.items():
            packs[key].put(row, image)
        return sha, extra, single

    results = _parallel(check, list(enumerate(todo)), workers, report)
    fresh = dict(zip(todo, results))
    for p, result in fresh.items():
        if not result[1].startswith(CANNOT_READ):  # a chmod changes neither size nor mtime: read it again next scan
            known[keys[p]] = result
    readable = [row for row, (sha, *_) in enumerate(results) if sha is not None]
    for pack in packs.values():
        rows = [row for row in readable if row in pack.filled]
        pack.publish([results[row][0] for row in rows], rows)
    if index and todo:
        _atomic_write(index, lambda fh: fh.write(json.dumps({"dhash": DHASH_VERSION, "files": known}).encode()))
    # an index entry from before single-band files were told apart reads as not single-band: cached in RGB
    return {p: _result(fresh[p] if p in fresh else known[keys[p]]) for p in files}


def _read_index(index: Path | None) -> dict[str, list]:
    """The scan index's results by file key; an index whose difference hashes another version of _dhash made is
    read as empty, so its files are checked again (hashes of two versions do not compare)."""
    if index is None or not index.exists():
        return {}
    found = json.loads(index.read_text())
    return found["files"] if found.get("dhash") == DHASH_VERSION else {}


def _result(entry: Any) -> tuple[str | None, str, bool]:
    sha, extra, *single = entry
    return sha, extra, bool(single and single[0])


def scan(root: str | os.PathLike, classes: Iterable[str] | None = None, cache_dir: str | os.PathLike | None = None,
         workers: int | None = None, sizes: Iterable[Size] = (), report: Report | None = None) -> Dataset:
    """Find the class folders, check every file once and list the ones that cannot be used.

    With a cache_dir, `sizes` such as [(50, "rgb")] makes the decode that checks each new file also
    fill the pixel cache, so the first trial's arrays() decodes nothing.
    """
    root_path = Path(root).expanduser().absolute()
    if not root_path.is_dir():
        raise DataError(f"data directory not found: {root_path}")
    names = _class_names(classes)
    folders, layouts = {}, set()
    for name in names:
        hit = _class_dir(root_path, name)
        if hit is None:
            raise DataError(f"class folder for {name!r} not found under {root_path}")
        folders[name], layout = hit
        layouts.add(layout)
    listed = {name: _folder_files(folder) for name, folder in folders.items()}
    files = {name: paths for name, (paths, _) in listed.items()}
    results = _checked([p for paths in files.values() for p in paths], Path(cache_dir) if cache_dir else None,
                       workers, tuple(sizes), report)

    samples, skipped = [], []
    for label, name in enumerate(names):
        readable, unusable = 0, listed[name][1]
        for p in files[name]:
            sha, extra, single = results[p]
            if sha is None:
                unusable.append((str(p), extra))
            else:
                samples.append(Sample(str(p), label, sha, extra, p.relative_to(root_path).as_posix(), single))
                readable += 1
        if not readable:
            raise DataError(f"class {name!r} has no readable image in {folders[name]}")
        skipped += sorted(unusable)
    layout = layouts.pop() if len(layouts) == 1 else "mixed"
    return Dataset(str(root_path), layout, names, samples, skipped)


# ---------------------------------------------------------------- split and leakage


def _seeded_order(samples: list[Sample], seed: int) -> list[int]:
    """A shuffle made from the seed and the file contents only (hashlib, not a numpy RNG stream),
    so it is the same on any machine and wherever the files live; names only break content ties."""
    return sorted(range(len(samples)),
                  key=lambda i: (hashlib.sha256(f"{seed}:{samples[i].sha256}".encode()).digest(), samples[i].name))


def split(dataset: Dataset, seed: int, val_fraction: float = 0.2, test_per_class: int = 40,
          test_dataset: Dataset | None = None, dedupe: bool = False) -> Split:
    """Deterministic stratified split; the same seed and files give the same split on any machine."""
    if test_per_class < 0 or not 0 <= val_fraction < 1:
        raise DataError(f"--test-per-class must be >= 0 and the validation fraction in [0, 1), "
                        f"got {test_per_class} and {val_fraction}")
    order = _seeded_order(dataset.samples, seed)
    assign = np.empty(len(dataset.samples), dtype="<U8")
    labels = dataset.labels
    n_test = 0 if test_dataset is not None else test_per_class
    for label, name in enumerate(dataset.classes):
        idx = np.array([i for i in order if labels[i] == label], dtype=np.int64)
        n_val = int(round(val_fraction * (len(idx) - n_test)))
        if len(idx) - n_test - n_val < 1 or (val_fraction > 0 and n_val < 1):
            raise DataError(f"class {name!r} has {len(idx)} images: too few for {n_test} test "
                            f"images and a {val_fraction:.0%} validation split")
        assign[idx[:n_test]] = "test"
        assign[idx[n_test:n_test + n_val]] = "val"
        assign[idx[n_test + n_val:]] = "train"
    if dedupe:
        rank = np.argsort(order)
        for group in duplicate_groups(dataset.samples):
            assign[group] = assign[group[np.argmin(rank[group])]]  # the whole group goes where its first member went
    if test_dataset is not None:
        assign[_copies_of(dataset.samples, test_dataset.samples, near=dedupe)] = "excluded"
    pick = lambda name: np.flatnonzero(assign == name)  # noqa: E731
    test_ds = test_dataset or dataset
    test = pick("test") if test_dataset is None else np.arange(len(test_dataset.samples))
    return Split(pick("train"), pick("val"), test, test_ds, pick("excluded"))


def _copies_of(samples: list[Sample], test: list[Sample], near: bool) -> list[int]:
    """Indices of samples that are exact (and, with near=True, near) copies of a test image."""
    test_hashes = {s.sha256 for s in test}
    hits = {i for i, s in enumerate(samples) if s.sha256 in test_hashes}
    if near:
        hits |= {i for i, _, _ in near_pairs(samples, test)}
    return sorted(hits)


def _hash_bits(samples: list[Sample]) -> np.ndarray:
    return np.array([np.frombuffer(bytes.fromhex(s.dhash), dtype=np.uint64) for s in samples]).reshape(len(samples), -1)


def near_pairs(a: list[Sample], b: list[Sample], same: bool = False) -> list[tuple[int, int, int]]:
    """Pairs (i, j, distance) whose difference hashes differ in at most NEAR_DUPLICATE_BITS bits."""
    if not a or not b:
        return []
    ha, hb = _hash_bits(a), _hash_bits(b)
    pairs = []
    for start in range(0, len(ha), 512):
        block = ha[start:start + 512]
        dist = np.bitwise_count(block[:, None, :] ^ hb[None, :, :]).sum(axis=2)
        for i, j in zip(*np.nonzero(dist <= NEAR_DUPLICATE_BITS)):
            i = int(i) + start
            if not same or i < j:
                pairs.append((i, int(j), int(dist[i - start, j])))
    return pairs


def duplicate_groups(samples: list[Sample]) -> list[np.ndarray]:
    """Groups of exact or near duplicates (union-find over hash matches), singletons left out."""
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_sha: dict[str, int] = {}
    for i, s in enumerate(samples):
        j = by_sha.setdefault(s.sha256, i)
        parent[find(i)] = find(j)
    for i, j, _ in near_pairs(samples, samples, same=True):
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(samples)):
        groups.setdefault(find(i), []).append(i)
    return [np.array(g) for g in groups.values() if len(g) > 1]


def leakage(dataset: Dataset, parts: Split) -> dict:
    """Count and list exact and near duplicates that cross the train/validation/test boundary."""
    members = {"train": [dataset.samples[i] for i in parts.train],
               "val": [dataset.samples[i] for i in parts.val],
               "test": [parts.test_dataset.samples[i] for i in parts.test]}
    exact, near = [], []
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        index = {s.sha256: s for s in members[a]}
        exact += [{"splits": f"{a}/{b}", "a": index[s.sha256].path, "b": s.path}
                  for s in members[b] if s.sha256 in index]
        for i, j, d in near_pairs(members[a], members[b]):
            if members[a][i].sha256 != members[b][j].sha256:
                near.append({"splits": f"{a}/{b}", "a": members[a][i].path, "b": members[b][j].path, "bits": d})
    return {"exact_duplicates": len(exact), "near_duplicates": len(near), "exact": exact, "near": near,
            "near_threshold_bits": NEAR_DUPLICATE_BITS}


def manifest_rows(dataset: Dataset, parts: Split) -> list[dict]:
    """One row per image: file, class, split, content hash (the record of what was held out)."""
    rows = []
    for name, idx, ds in [*parts.members(dataset), ("excluded", parts.excluded, dataset)]:
        rows += [{"file": ds.samples[i].path, "class": ds.classes[ds.samples[i].label], "split": name,
                  "sha256": ds.samples[i].sha256} for i in idx]
    return rows


def skipped_lines(dataset: Dataset, csv_name: str, shown: int = 5) -> list[str]:
    """Console lines for the skipped files: how many, the first `shown` with why, and the CSV that lists them all."""
    if not dataset.skipped:
        return []
    lines = [f"skipped {len(dataset.skipped)} file(s) that cannot be used, all listed in {csv_name}:"]
    lines += [f"  {os.path.relpath(path, dataset.root)}: {reason}" for path, reason in dataset.skipped[:shown]]
    if len(dataset.skipped) > shown:
        lines.append(f"  ... and {len(dataset.skipped) - shown} more")
    return lines


def write_csv(rows: list[dict], path: Path) -> None:
    """Write dict rows as CSV (manifest, skipped files)."""
    with open(path, "w", newline="") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """'balanced' weights from the real training counts, as scikit-learn computes them."""
    counts = np.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        raise DataError(f"a class has no training image (counts {counts.tolist()})")
    return {i: float(len(labels) / (n_classes * c)) for i, c in enumerate(counts)}


# ---------------------------------------------------------------- pixels


def to_mode(im: Image.Image, color_mode: str) -> Image.Image:
    """Convert any PNG/JPEG mode (L, RGB, RGBA, P, 16-bit, CMYK, ...) to 8-bit grayscale or RGB."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.rint(np.clip(arr * (255.0 / top), 0, 255)).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)
    target = "L" if color_mode == "grayscale" else "RGB"
    return im if im.mode == target else im.convert(target)


def decode(source: str | os.PathLike | bytes, size: int, color_mode: str = "rgb") -> np.ndarray:
    """One image as uint8 (size, size, channels): the only place pixels are produced."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        return _pixels(im, size, color_mode)


def resize(im: Image.Image, size: int, color_mode: str = "rgb") -> np.ndarray:
    """Pixels already in memory (a served uint8 array) as decode gives a file's: uint8 (size, size, channels)."""
    return _pixels(im, size, color_mode)


def _single_band(im: Image.Image) -> bool:
    """A grayscale file (L, 16-bit, ...): its RGB pixels are its grayscale pixels in three channels."""
    return len(im.getbands()) == 1 and im.mode != "P"


def _pixels(im: Image.Image, size: int, color_mode: str) -> np.ndarray:
    """An open image resized to uint8 (size, size, channels)."""
    # A grayscale file is resized as one band and widened after: the same pixels, a third of the work.
    small = to_mode(im, "grayscale" if _single_band(im) else color_mode).resize((size, size), Image.BILINEAR)
    arr = np.asarray(to_mode(small, color_mode), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def channels(color_mode: str) -> int:
    return 1 if color_mode == "grayscale" else 3


# The pixel cache: per input size and colour mode, a folder of immutable packs. A pack is
# <id>.npy (uint8 images) plus <id>.sha (their raw sha256 digests, written last), so an image is
# found by its contents wherever its file lives and is decoded once per size and mode, ever.


def _store(cache_dir: str | os.PathLike, size: int, color_mode: str) -> Path:
    return Path(cache_dir) / "pixels" / f"{size}px-{color_mode}"


def _kept(size: int, color_mode: str, single_band: bool) -> Size:
    """The cache an image's pixels at this size and mode are kept in: a single-band image's RGB pixels are its
    grayscale ones, kept once in one channel (a third of the bytes to write and read) and widened where read."""
    return size, "grayscale" if single_band and color_mode == "rgb" else color_mode


def arrays(dataset: Dataset, size: int, color_mode: str, cache_dir: str | os.PathLike,
           workers: int | None = None) -> np.ndarray:
    """All images of a dataset as uint8 (n, size, size, channels), decoded once and then read from disk: a mapped
    pack when one holds exactly these images (RGB of grayscale files: its one channel broadcast to three, no copy),
    else gathered from the packs into memory."""
    groups: dict[Size, list[Sample]] = {}
    for s in dataset.samples:
        groups.setdefault(_kept(size, color_mode, s.gray), []).append(s)
    for key, samples in groups.items():
        _fill(_store(cache_dir, *key), samples, *key, workers)
    if len(groups) == 1:
        store = _store(cache_dir, *next(iter(groups)))
        whole = store / f"{_pack_name(s.sha256 for s in dataset.samples)}.sha"
        if whole.exists():  # one pack holds exactly these images in this order: map it, copy nothing
            pixels = np.load(whole.with_suffix(".npy"), mmap_mode="r")
            wanted = channels(color_mode)
            return pixels if pixels.shape[-1] == wanted else np.broadcast_to(pixels, (*pixels.shape[:3], wanted))
    found = {key: _cached(_store(cache_dir, *key)) for key in groups}
    out = np.empty((len(dataset.samples), size, size, channels(color_mode)), dtype=np.uint8)
    for i, s in enumerate(dataset.samples):
        out[i] = found[_kept(size, color_mode, s.gray)][s.sha256]  # one channel broadcasts to three
    return out


class Rows:
    """Some rows of a (memory-mapped) pixel array, read when indexed: a split of the cache without a copy of it,
    which at 299 px is gigabytes."""

    def __init__(self, pixels: np.ndarray, rows: np.ndarray):
        self.pixels, self.rows = pixels, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.pixels.shape[1:])

    def __getitem__(self, which: Any) -> np.ndarray:
        """Rows `which` (positions in this split) as an in-memory uint8 array, read from the file in its order."""
        rows = self.rows[which]
        if np.ndim(rows) == 0:
            return np.ascontiguousarray(self.pixels[int(rows)])
        order = np.argsort(rows, kind="stable")
        if self.pixels.strides[-1] != 0:
            out = np.empty((len(rows), *self.pixels.shape[1:]), dtype=self.pixels.dtype)
            out[order] = self.pixels[rows[order]]
            return out
        # a one-channel pack read as RGB (arrays): gather its rows (a third of the bytes), then copy the channel out
        gray = self.pixels[..., 0][rows[order]][np.argsort(order)]
        out = np.empty((*gray.shape, self.pixels.shape[-1]), dtype=self.pixels.dtype)
        for channel in range(out.shape[-1]):
            out[..., channel] = gray
        return out


def _fill(store: Path, samples: list[Sample], size: int, color_mode: str, workers: int | None) -> None:
    """Decode the images the cache lacks, each once, into a new pack."""
    store.mkdir(parents=True, exist_ok=True)
    cached = _cached(store)
    if all(s.sha256 in cached for s in samples):
        return
    with open(store / "fill.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the first one's pack
        found = _cached(store)
        missing = list({s.sha256: s for s in samples if s.sha256 not in found}.values())
        if missing:
            pack = _Pack(store, len(missing), size, color_mode)
            _parallel(lambda item: pack.put(item[0], decode(item[1].path, size, color_mode)), list(enumerate(missing)),
                      workers)
            pack.publish([s.sha256 for s in missing])


def _cached(store: Path) -> dict[str, np.ndarray]:
    """Every cached image of this size and mode by content hash, as memory-mapped rows."""
    found = {}
    for index in sorted(store.glob("*.sha")):
        pixels = np.load(index.with_suffix(".npy"), mmap_mode="r")
        digests = index.read_bytes()
        found.update((digests[32 * k:32 * k + 32].hex(), row) for k, row in enumerate(pixels))
    return found


def _pack_name(digests: Iterable[str]) -> str:
    """A pack is named by its images' hashes in order: the same images give the same name."""
    return hashlib.sha256(b"".join(bytes.fromhex(d) for d in digests)).hexdigest()[:24]


class _Pack:
    """A new pack filled row by row as images decode, written to its file at each row's place: neither the
    pack (5.7 GB at 299 px for the full release) nor its pages stay in this process's memory."""

    def __init__(self, store: Path, rows: int, size: int, color_mode: str):
        store.mkdir(parents=True, exist_ok=True)
        self.store, self.shape = store, (rows, size, size, channels(color_mode))
        self.path, self.fd, self.offset = self._create(rows)
        self.filled: set[int] = set()  # rows put so far

    def _create(self, rows: int) -> tuple[str, int, int]:
        """An .npy file of `rows` zero rows (sparse on disk): its path, an open descriptor, where row 0 starts."""
        fd, path = tempfile.mkstemp(dir=self.store, prefix="filling.", suffix=".npy")
        with os.fdopen(os.dup(fd), "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (rows, *self.shape[1:])})
            offset = fh.tell()
        os.ftruncate(fd, offset + rows * self.row_bytes)
        return path, fd, offset

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:]))

    def put(self, row: int, image: np.ndarray) -> None:
        self.filled.add(row)
        os.pwrite(self.fd, memoryview(np.ascontiguousarray(image, dtype=np.uint8)).cast("B"),
                  self.offset + row * self.row_bytes)

    def publish(self, digests: list[str], rows: list[int] | None = None) -> None:
        """Keep `rows` (the readable images; all when None) under the name their digests give, pixels first, then
        the digest index that readers look for; two processes racing to write the same images write one pack."""
        if not digests:
            os.close(self.fd)
            Path(self.path).unlink()
            return
        if rows is not None and len(rows) < self.shape[0]:
            self._compact(rows)
        os.close(self.fd)
        name = _pack_name(digests)
        os.replace(self.path, self.store / f"{name}.npy")
        _atomic_write(self.store / f"{name}.sha", lambda fh: fh.write(b"".join(bytes.fromhex(d) for d in digests)))

    def _compact(self, rows: list[int]) -> None:
        """Drop the rows of unreadable files, a row at a time."""
        path, fd, offset = self._create(len(rows))
        for new, old in enumerate(rows):
            os.pwrite(fd, os.pread(self.fd, self.row_bytes, self.offset + old * self.row_bytes),
                      offset + new * self.row_bytes)
        os.close(self.fd)
        os.replace(path, self.path)
        self.fd, self.offset = fd, offset
