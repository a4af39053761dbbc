"""Synthetic chest-X-ray-like images for the newcomer demo and the tests.

NOT real X-rays: two dark lung fields on a bright body; "COVID-19" adds bright blotches in
the lower lung periphery, "Viral Pneumonia" a diffuse haze, "Normal" neither. A model can
learn them in a few epochs, which is all a demo or a test needs. The real database is at
https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASS_FOLDERS = {"COVID-19": "COVID-19", "Normal": "NORMAL", "Viral Pneumonia": "Viral Pneumonia"}


def synthetic_xray(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One grayscale uint8 image of the given class."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.75 + 0.05 * rng.standard_normal((size, size))
    for cx in (0.32, 0.68):
        lung = ((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        img[lung] -= 0.45
    if kind == "COVID-19":
        for _ in range(rng.integers(4, 7)):
            cx, cy = rng.choice([0.25, 0.75]) + 0.04 * rng.standard_normal(), 0.62 + 0.08 * rng.standard_normal()
            img += 0.6 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / 0.004))
    elif kind == "Viral Pneumonia":
        img += 0.35 * np.exp(-(((yy - 0.5) ** 2) / 0.04)) + 0.08 * rng.standard_normal((size, size))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_dataset(root: str | Path, per_class: int = 60, size: int = 64, seed: int = 0,
                 layout: str = "tutorial") -> Path:
    """Write a small synthetic dataset in the tutorial layout (<root>/<class>/*.png) or the Kaggle one."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for kind, folder in CLASS_FOLDERS.items():
        target = root / folder
        if layout == "kaggle":
            target = root / "COVID-19_Radiography_Dataset" / {"COVID-19": "COVID"}.get(kind, kind) / "images"
        target.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(synthetic_xray(kind, size, rng), "L").save(target / f"{folder}-{i}.png")
    return root
