"""Dataset discovery, file checks, the held-out split, leakage check and the decode-once cache.

Flow: scan(root) finds class folders in either published layout and checks every file once;
split() makes the deterministic stratified train/validation/test split; leakage() finds
duplicates across splits; arrays() returns uint8 pixels from an on-disk cache so that no
epoch ever decodes a PNG again.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_CLASSES = ("COVID-19", "Normal", "Viral Pneumonia")
# Folder names used by the tutorial's copy and by the current Kaggle release.
CLASS_ALIASES = {
    "COVID-19": ("COVID-19", "COVID"),
    "Normal": ("NORMAL", "Normal"),
    "Viral Pneumonia": ("Viral Pneumonia",),
    "Lung_Opacity": ("Lung_Opacity", "Lung Opacity"),
}
NEAR_DUPLICATE_BITS = 10  # Hamming distance on the 256-bit difference hash
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A dataset problem the user must fix; its message is shown as the one-line error."""


@dataclass(frozen=True)
class Sample:
    """One readable image: where it is, its class index and the hashes that identify it."""

    path: str
    label: int
    sha256: str
    dhash: str  # 256-bit difference hash, hex


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
    """Indices into Dataset.samples for each split (test may index a separate test dataset)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_dataset: Dataset


def metric_safe(name: str) -> str:
    """Class name as it appears in metric names, e.g. 'COVID-19' -> 'covid_19'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ---------------------------------------------------------------- scanning


def _class_dir(root: Path, name: str) -> tuple[Path, str] | None:
    """Find a class's image folder in the tutorial layout or the Kaggle layout."""
    for alias in CLASS_ALIASES.get(name, (name,)):
        for base in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
            candidate = base / alias
            if (candidate / "images").is_dir():
                return candidate / "images", "kaggle"
            if candidate.is_dir():
                return candidate, "tutorial"
    return None


def _canonical(name: str) -> str:
    """Map a folder name or alias given by the user to the canonical class name."""
    for canonical, aliases in CLASS_ALIASES.items():
        if name.lower() in (a.lower() for a in (canonical, *aliases)):
            return canonical
    return name


def _check_file(path: str) -> tuple[str, str, str] | tuple[str, None, str]:
    """Decode a file fully once; return (path, sha256, dhash) or (path, None, reason)."""
    data = Path(path).read_bytes()
    if not data:
        return path, None, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            gray = to_mode(im, "grayscale")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return path, None, f"unreadable image: {err}".splitlines()[0]
    return path, hashlib.sha256(data).hexdigest(), _dhash(gray)


def _dhash(gray: Image.Image) -> str:
    """256-bit difference hash, robust to resizing and re-encoding, for near-duplicate search."""
    small = np.asarray(gray.resize((17, 16), Image.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return np.packbits(bits).tobytes().hex()


def _scan_cache_load(cache_dir: Path) -> dict:
    path = cache_dir / "scan.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _atomic_write(path: Path, write) -> None:
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


def scan(root: str | os.PathLike, classes: list[str] | None = None, cache_dir: str | os.PathLike | None = None,
         workers: int = 2) -> Dataset:
    """Find the class folders, check every file once and list the ones that cannot be used."""
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f"data directory not found: {root_path}")
    names = [_canonical(c) for c in (classes or DEFAULT_CLASSES)]
    if len(set(names)) < 2:
        raise DataError(f"need at least two classes, got {names}")
    found = {}
    layouts = set()
    for name in names:
        hit = _class_dir(root_path, name)
        if hit is None:
            raise DataError(f"class folder for {name!r} not found under {root_path}")
        found[name], layout = hit
        layouts.add(layout)
    files = {name: sorted(p for p in d.iterdir() if p.is_file()) for name, d in found.items()}

    cache = Path(cache_dir) if cache_dir else None
    known = _scan_cache_load(cache) if cache else {}
    todo, results = [], {}
    for paths in files.values():
        for p in paths:
            st = p.stat()
            key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
            if key in known:
                results[str(p)] = tuple(known[key])
            else:
                todo.append((str(p), key))
    if todo:
        paths = [t[0] for t in todo]
        if workers > 1 and len(paths) > 64:
            with ProcessPoolExecutor(workers) as pool:
                checked = list(pool.map(_check_file, paths, chunksize=32))
        else:
            checked = [_check_file(p) for p in paths]
        for (path, key), (_, sha, extra) in zip(todo, checked):
            results[path] = (sha, extra)
            known[key] = (sha, extra)
        if cache:
            _atomic_write(cache / "scan.json", lambda fh: fh.write(json.dumps(known).encode()))

    samples, skipped = [], []
    for label, name in enumerate(names):
        for p in files[name]:
            sha, extra = results[str(p)]
            if sha is None:
                skipped.append((str(p), extra))
            else:
                samples.append(Sample(str(p), label, sha, extra))
        if not any(s.label == label for s in samples):
            raise DataError(f"class {name!r} has no readable image in {found[name]}")
    layout = layouts.pop() if len(layouts) == 1 else "mixed"
    return Dataset(str(root_path), layout, names, samples, skipped)


# ---------------------------------------------------------------- split and leakage


def split(dataset: Dataset, seed: int, val_fraction: float = 0.2, test_per_class: int = 40,
          test_dataset: Dataset | None = None, dedupe: bool = False) -> Split:
    """Deterministic stratified split; the same seed and files give the same split on any machine."""
    order = sorted(range(len(dataset.samples)), key=lambda i: dataset.samples[i].sha256 + dataset.samples[i].path)
    rng = np.random.Generator(np.random.PCG64(seed))
    assign = np.empty(len(dataset.samples), dtype="<U5")
    labels = dataset.labels
    for label, name in enumerate(dataset.classes):
        idx = np.array([i for i in order if labels[i] == label], dtype=np.int64)
        idx = idx[rng.permutation(len(idx))]
        n_test = 0 if test_dataset is not None else test_per_class
        n_val = int(round(val_fraction * (len(idx) - n_test)))
        if len(idx) - n_test - n_val < 1 or (n_test and n_val < 1 and val_fraction > 0):
            raise DataError(f"class {name!r} has {len(idx)} images: too few for {n_test} test "
                            f"images and a {val_fraction:.0%} validation split")
        assign[idx[:n_test]] = "test"
        assign[idx[n_test:n_test + n_val]] = "val"
        assign[idx[n_test + n_val:]] = "train"
    if test_dataset is not None:
        test_hashes = {s.sha256 for s in test_dataset.samples}
        for i, s in enumerate(dataset.samples):
            if s.sha256 in test_hashes:  # an exact copy of a test image never trains
                assign[i] = "test-dup"
    if dedupe:
        for group in duplicate_groups(dataset.samples):
            home = assign[min(group, key=lambda i: dataset.samples[i].path)]
            assign[group] = home
    pick = lambda name: np.flatnonzero(assign == name)  # noqa: E731
    if test_dataset is None:
        return Split(pick("train"), pick("val"), pick("test"), dataset)
    return Split(pick("train"), pick("val"), np.arange(len(test_dataset.samples)), test_dataset)


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
    for name, idx, ds in (("train", parts.train, dataset), ("val", parts.val, dataset),
                          ("test", parts.test, parts.test_dataset)):
        rows += [{"file": ds.samples[i].path, "class": ds.classes[ds.samples[i].label], "split": name,
                  "sha256": ds.samples[i].sha256} for i in idx]
    return rows


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
        im = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
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
        im = to_mode(im, color_mode).resize((size, size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _decode_job(args: tuple[str, int, str]) -> np.ndarray:
    return decode(*args)


def channels(color_mode: str) -> int:
    return 1 if color_mode == "grayscale" else 3


def arrays(dataset: Dataset, size: int, color_mode: str, cache_dir: str | os.PathLike, workers: int = 2) -> np.ndarray:
    """All images of a dataset as uint8 pixels, decoded once per size and mode and cached on disk."""
    cache = Path(cache_dir) / "pixels"
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{size}|{color_mode}|".encode() + "".join(s.sha256 for s in dataset.samples).encode())
    path = cache / f"{size}px-{color_mode}-{key.hexdigest()[:24]}.npy"
    if not path.exists():
        with open(cache / (path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the finished file
            if not path.exists():
                _fill(dataset, size, color_mode, path, workers)
    return np.load(path, mmap_mode="r")


def _fill(dataset: Dataset, size: int, color_mode: str, path: Path, workers: int) -> None:
    """Decode every image once into one array file."""
    jobs = [(s.path, size, color_mode) for s in dataset.samples]
    out = np.empty((len(jobs), size, size, channels(color_mode)), dtype=np.uint8)
    if workers > 1 and len(jobs) > 64:
        with ProcessPoolExecutor(workers) as pool:
            for i, arr in enumerate(pool.map(_decode_job, jobs, chunksize=32)):
                out[i] = arr
    else:
        for i, job in enumerate(jobs):
            out[i] = _decode_job(job)
    _atomic_write(path, lambda fh: np.save(fh, out))
