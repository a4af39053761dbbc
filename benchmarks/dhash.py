"""The near-duplicate hash (issue 15): a cheaper difference hash, checked against the one it replaces on real X-rays.

The scan hashes every file it decodes. Pillow's fair bilinear resize of a 299 px image to the hash's 17 x 16 grid
filters every pixel with a kernel 35 pixels wide, which cost the scan more than its SHA-256 and its pixel cache
together. With `reducing_gap`, Pillow first averages blocks of pixels (Image.reduce) and then resizes what is left, a
few times the grid's size, fairly. This script measures, on the real images (--data) and one hash against the other:
  time      microseconds a hash, one core, on the images as they are and upscaled to the release's 299 px
  agreement how many of the 256 bits a hash of the same image changes
  distinct  the distances between distinct images (all pairs): the closest pairs and how many lie within 8-16 bits,
            against data.NEAR_DUPLICATE_BITS (the threshold must stay below the closest distinct pair)
  edited    edited copies of --edited random images (the photometric edits a copy goes through, and three geometric
            ones no difference hash catches): the share within the threshold
  leakage   the split's leakage check (exact and near duplicates across train, validation and test) with each hash
Figures are printed, never asserted:

    .venv/bin/python benchmarks/dhash.py [--data ../shared/data/covid-radiography] [--edited 400]
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covidsearch import data  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-radiography"
RELEASE_SIDE = 299
WITHIN = (8, 9, 10, 12, 14, 16)


def fair(gray: Image.Image) -> np.ndarray:
    """The hash before: a fair bilinear resize of every pixel to 17 x 16 (the scan's until this change)."""
    return _bits(gray.resize((17, 16), Image.BILINEAR))


def _bits(small: Image.Image) -> np.ndarray:
    values = np.asarray(small, dtype=np.int16)
    return np.packbits(values[:, 1:] > values[:, :-1]).view(np.uint64)


def scan_hash(gray: Image.Image) -> np.ndarray:
    """The scan's hash as it is now (data._dhash)."""
    return np.frombuffer(bytes.fromhex(data._dhash(gray)), dtype=np.uint64)


def edits(rng: np.random.Generator) -> dict[str, Callable[[Image.Image], Image.Image]]:
    """Edits a copy of an X-ray may have gone through, by name."""
    def jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
        def encode(im: Image.Image) -> Image.Image:
            out = io.BytesIO()
            im.save(out, "JPEG", quality=quality)
            return Image.open(io.BytesIO(out.getvalue())).convert("L")
        return encode

    def noise(im: Image.Image) -> Image.Image:
        pixels = np.asarray(im, np.float32) + rng.normal(0, 5, (im.height, im.width))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")

    def text(im: Image.Image) -> Image.Image:
        im = im.copy()
        ImageDraw.Draw(im).text((8, 8), "L  AP PORTABLE", fill=255)
        return im

    def box(im: Image.Image) -> Image.Image:
        im = im.copy()
        ImageDraw.Draw(im).rectangle((im.width * 0.6, 4, im.width - 4, im.height * 0.2), fill=255)
        return im

    gamma = [round(255 * (v / 255) ** 0.8) for v in range(256)]
    return {"JPEG quality 50": jpeg(50), "JPEG quality 20": jpeg(20),
            "brightness +5%": lambda im: ImageEnhance.Brightness(im).enhance(1.05),
            "brightness +10%": lambda im: ImageEnhance.Brightness(im).enhance(1.10),
            "brightness -10%": lambda im: ImageEnhance.Brightness(im).enhance(0.90),
            "contrast x0.8": lambda im: ImageEnhance.Contrast(im).enhance(0.8),
            "gamma 0.8": lambda im: im.point(gamma),
            "resized to 128 px": lambda im: im.resize((128, 128), Image.BILINEAR),
            "Gaussian blur sigma 1": lambda im: im.filter(ImageFilter.GaussianBlur(1)),
            "noise sigma 5": noise, "burned-in text": text, "histogram equalisation": ImageOps.equalize,
            "large label box": box, "4 px crop": lambda im: im.crop((4, 4, im.width - 4, im.height - 4)),
            "2 degree rotation": lambda im: im.rotate(2, Image.BILINEAR),
            "8 px padding": lambda im: ImageOps.expand(im, 8, fill=0)}


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ, row by row."""
    return np.bitwise_count(a ^ b).sum(axis=1)


def pair_distances(hashes: np.ndarray) -> np.ndarray:
    """The distance of every pair of distinct images (upper triangle)."""
    found = [np.bitwise_count(hashes[i + 1:] ^ hashes[i]).sum(axis=1) for i in range(len(hashes) - 1)]
    return np.concatenate(found)


def microseconds(fn: Callable[[Image.Image], np.ndarray], images: list[Image.Image]) -> float:
    """The best of three passes, per image."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for im in images:
            fn(im)
        best = min(best, time.perf_counter() - started)
    return best / len(images) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--edited", type=int, default=400, help="how many images to edit")
    args = parser.parse_args()
    dataset = data.scan(args.data)
    images = [Image.open(s.path).convert("L") for s in dataset.samples]
    print(f"{len(images)} images of {args.data} ({images[0].width} px); the threshold is "
          f"{data.NEAR_DUPLICATE_BITS} bits")
    hashes = {"fair (before)": fair, "reduced (now)": scan_hash}

    sample = images[:500]
    release = [im.resize((RELEASE_SIDE, RELEASE_SIDE), Image.BILINEAR) for im in sample]
    print("\nmicroseconds a hash, one core:")
    for name, fn in hashes.items():
        print(f"  {name:<32} {microseconds(fn, sample):6.0f} at {sample[0].width} px, "
              f"{microseconds(fn, release):6.0f} at {RELEASE_SIDE} px")

    table = {name: np.stack([fn(im) for im in images]) for name, fn in hashes.items()}
    old, new = table.values()
    moved = distances(old, new)
    print(f"\nthe same image, one hash against the other: bits changed mean {moved.mean():.2f}, median "
          f"{np.median(moved):.0f}, 95th percentile {np.percentile(moved, 95):.0f}, max {moved.max()}")

    print("\ndistinct images, all pairs:")
    print(f"  {'hash':<32} {'closest':>8} " + " ".join(f"{'<=' + str(t):>7}" for t in WITHIN))
    for name, hashed in table.items():
        pairs = pair_distances(hashed)
        print(f"  {name:<32} {pairs.min():>8} " + " ".join(f"{int((pairs <= t).sum()):>7}" for t in WITHIN))

    rng = np.random.default_rng(28)
    chosen = rng.choice(len(images), size=min(args.edited, len(images)), replace=False)
    print(f"\nedited copies of {len(chosen)} images, the share within {data.NEAR_DUPLICATE_BITS} bits of the original:")
    print(f"  {'edit':<24} " + " ".join(f"{name[:16]:>16}" for name in hashes))
    for edit_name, edit in edits(rng).items():
        copies = [edit(images[i]) for i in chosen]
        shares = [(distances(table[name][chosen], np.stack([fn(c) for c in copies])) <= data.NEAR_DUPLICATE_BITS).mean()
                  for name, fn in hashes.items()]
        print(f"  {edit_name:<24} " + " ".join(f"{share:>16.2f}" for share in shares))

    parts = data.split(dataset, 28)
    print("\nthe leakage check of the default split (seed 28, 40 test images a class):")
    for name, hashed in table.items():
        samples = [data.Sample(s.path, s.label, s.sha256, h.tobytes().hex(), s.name, s.gray)
                   for s, h in zip(dataset.samples, hashed)]
        relabelled = data.Dataset(dataset.root, dataset.layout, dataset.classes, samples)
        found = data.leakage(relabelled, data.Split(parts.train, parts.val, parts.test, relabelled))
        groups = data.duplicate_groups(samples)
        print(f"  {name:<32} exact {found['exact_duplicates']}, near {found['near_duplicates']}, "
              f"duplicate groups over all images {len(groups)}")


if __name__ == "__main__":
    main()
