"""Epoch wall time of the tutorial's input pipeline against covidsearch's decode-once cache (issue 3).

One process, the same images and the tutorial ConvNet (50 px, batch 250, Adam) on every side:
  tutorial    ImageDataGenerator(rescale=1/255, validation_split=0.2).flow_from_directory(...,
              subset="training" / "validation", seed=28), as published: every epoch decodes and
              resizes every PNG again.
  cold        a fresh cache: data.scan(sizes=[(50, "rgb")]) checks each file with the same decode
              that fills the cache, data.arrays reads it; the first epoch includes both.
  cold-2pass  a fresh cache filled by data.arrays after a plain data.scan: two decodes per file
              (what a search does while it does not pass `sizes` to scan).
  warm        the cache the cold side left (a later trial or search): nothing is decoded.
covidsearch's model is covidsearch.models.build with the vanilla space's defaults (uint8 input);
its split is the tutorial's 80/20 with no test images held out, so both train on 2,240 images and
validate on 560 each epoch (--train-only leaves validation out on both sides). Every side builds a
fresh model, so every first epoch also pays for tracing it. Sides run in turn, `--rounds` times,
and medians are reported; figures are printed, never asserted:

    .venv/bin/python benchmarks/pipeline.py [--data DIR] [--epochs 5] [--rounds 2] [--train-only]
    KERAS_BACKEND=jax .venv/bin/python benchmarks/pipeline.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402

from covidsearch import data, models, spaces  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-radiography"
SIZE, BATCH, SEED = 50, 250, 28
SIDES = ("tutorial", "cold", "cold-2pass", "warm")
Epochs = list[tuple[float, float]]  # (wall, CPU) seconds per epoch


class EpochClock(keras.callbacks.Callback):
    """Wall and process CPU seconds per epoch, the first counted from the clock's creation so that
    pipeline set-up is in it. CPU seconds are the work done, which other users of a shared machine
    change much less than the wall time a user waits."""

    def __init__(self):
        super().__init__()
        self.marks = [(time.perf_counter(), time.process_time())]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def epochs(self) -> Epochs:
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.marks, self.marks[1:])]


def tutorial(root: Path, epochs: int, validate: bool) -> Epochs:
    """The published pipeline and model: generators that decode every image in every epoch."""
    from tensorflow.keras.preprocessing.image import ImageDataGenerator

    model = keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        keras.layers.Conv2D(32, (3, 3), activation="relu"),
        keras.layers.MaxPooling2D(pool_size=(2, 2)),
        keras.layers.Dropout(0.5),
        keras.layers.Flatten(),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(3, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    clock = EpochClock()
    generator = ImageDataGenerator(rescale=1 / 255, validation_split=0.2)
    train, val = (generator.flow_from_directory(str(root), target_size=(SIZE, SIZE), batch_size=BATCH,
                                                subset=subset, seed=SEED) for subset in ("training", "validation"))
    model.fit(train, validation_data=val if validate else None, epochs=epochs, callbacks=[clock], verbose=0)
    return clock.epochs()


def covidsearch(root: Path, epochs: int, cache: Path, fill_in_scan: bool, validate: bool) -> Epochs:
    """covidsearch's path: scan, split, uint8 pixels from the cache, the vanilla space's default model."""
    space = spaces.load("vanilla")
    config = space.config(space.defaults())
    model = models.build(config, 3)
    clock = EpochClock()
    dataset = data.scan(root, cache_dir=cache, sizes=[(SIZE, config["color_mode"])] if fill_in_scan else ())
    parts = training_split(dataset)
    pixels = data.arrays(dataset, SIZE, config["color_mode"], cache)
    onehot = keras.utils.to_categorical(dataset.labels, 3)
    val = (pixels[parts.val], onehot[parts.val]) if validate else None
    model.fit(pixels[parts.train], onehot[parts.train], validation_data=val, batch_size=BATCH, epochs=epochs,
              shuffle=True, callbacks=[clock], verbose=0)
    return clock.epochs()


def training_split(dataset: data.Dataset) -> data.Split:
    """The tutorial's 80/20 split of the folder, no test images held out: as many images as it uses."""
    return data.split(dataset, SEED, val_fraction=0.2, test_per_class=0)


def run_round(root: Path, epochs: int, cache: Path, validate: bool) -> dict[str, Epochs]:
    """Every side once; the warm side reuses the cache the cold side filled."""
    return {
        "tutorial": tutorial(root, epochs, validate),
        "cold": covidsearch(root, epochs, cache / "one-pass", True, validate),
        "cold-2pass": covidsearch(root, epochs, cache / "two-pass", False, validate),
        "warm": covidsearch(root, epochs, cache / "one-pass", True, validate),
    }


def summary(rounds: list[Epochs]) -> tuple[float, float, float, float]:
    """Over all rounds: median first-epoch wall time; median, fastest and median CPU time of the later
    epochs. The fastest is the least disturbed by other users of the machine."""
    later = [epoch for epochs in rounds for epoch in epochs[1:]]
    return (statistics.median(epochs[0][0] for epochs in rounds), statistics.median(w for w, _ in later),
            min(w for w, _ in later), statistics.median(c for _, c in later))


def report(runs: dict[str, list[Epochs]], n_train: int, n_val: int) -> None:
    """The medians per side and the ratios the issue sets targets for."""
    med = {side: summary(rounds) for side, rounds in runs.items()}
    print(f"\nevery side trains on {n_train} images per epoch" + (f" and validates on {n_val}" if n_val else ""))
    print(f"{'side':<11} {'first epoch':>12} {'later epochs':>13} {'fastest later':>14} {'later CPU':>10}   "
          f"(seconds; medians but the fastest)")
    for side, (first, later, fastest, cpu) in med.items():
        print(f"{side:<11} {first:12.2f} {later:13.2f} {fastest:14.2f} {cpu:10.2f}")
    tutorial_first, tutorial_later, tutorial_fastest, tutorial_cpu = med["tutorial"]
    print(f"\nwarm epoch:             {tutorial_later / med['warm'][1]:5.2f}x faster than the tutorial's "
          f"(target >= 4x); fastest epochs {tutorial_fastest / med['warm'][2]:.2f}x; "
          f"{tutorial_cpu / med['warm'][3]:.2f}x less CPU work")
    for side in ("cold", "cold-2pass", "warm"):
        print(f"{side + ' first epoch:':<24}{tutorial_first / med[side][0]:5.2f}x faster than the tutorial's "
              f"first epoch{' (target >= 1x)' if side == 'cold' else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="tutorial-layout dataset root")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per side and round (2 or more)")
    parser.add_argument("--rounds", type=int, default=2, help="times every side runs, in turn")
    parser.add_argument("--train-only", action="store_true", help="no validation pass on either side")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is reported apart")
    keras.utils.set_random_seed(SEED)
    print(f"data {args.data}; keras {keras.__version__} on {keras.backend.backend()}; {os.cpu_count()} CPU cores; "
          f"{args.rounds} round(s) of {args.epochs} epochs per side; batch {BATCH}, {SIZE} px", flush=True)
    runs: dict[str, list[Epochs]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            cache = Path(tmp) / f"round-{k}"
            for side, epochs in run_round(args.data, args.epochs, cache, not args.train_only).items():
                runs[side].append(epochs)
                print(f"round {k + 1} {side:<10} epochs, wall/CPU s: "
                      + " ".join(f"{wall:.2f}/{cpu:.2f}" for wall, cpu in epochs), flush=True)
        parts = training_split(data.scan(args.data, cache_dir=Path(tmp) / "round-0" / "one-pass"))
    report(runs, len(parts.train), 0 if args.train_only else len(parts.val))


if __name__ == "__main__":
    main()
