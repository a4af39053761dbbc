"""GPU benchmark for issue 7: does covidsearch lose time around the GPU?

Run on a GPU machine as one command, JAX backend:

    KERAS_BACKEND=jax python benchmarks/gpu.py

Besides jax with CUDA (and numpy, scikit-learn, pillow, matplotlib, h5py, which the GPU image
has), it needs these wheels: keras, namex, optree, keras-tuner, kt-legacy, mlflow-skinny,
mlflow-tracing, sqlalchemy, alembic, mako, greenlet, and mlflow-skinny's own requirements
(see `.ci/device-wheels.txt`). On a machine without a GPU it runs a reduced mode (small images,
few trials) so CI can smoke-test it; `--quick` forces that mode.

It measures, in one run:
  (a) training images/s of the tutorial's InceptionV3 head at 256 px through covidsearch's own
      trial code path, against a jitted training step on device-resident data (the limit);
      target: at least 95% of the limit;
  (b) the per-trial fixed overhead of the tutorial ConvNet (process, data, build, compile,
      evaluation and logging: a trial's wall time minus its steady-state epochs); target <= 2 s;
  (c) trials per hour of a ConvNet search with 1 worker and with N workers sharing the GPU;
      target: at least 3x more with N workers.
It prints each figure and writes them as JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from covidsearch import data, demo, models, search, spaces, tracking, trial  # noqa: E402


def accelerator() -> str:
    """The device the backend trains on, in words."""
    if keras.backend.backend() == "jax":
        import jax
        device = jax.devices()[0]
        return f"{device.platform}: {getattr(device, 'device_kind', device)}"
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    return f"gpu: {tf.config.experimental.get_device_details(gpus[0]).get('device_name')}" if gpus else "cpu"


def make_data(root: Path, per_class: int, size: int) -> data.Dataset:
    """Synthetic X-ray-like images (timing does not depend on what the pixels show)."""
    demo.make_dataset(root, per_class=per_class, size=size, seed=0)
    return data.scan(root, cache_dir=root / "cache")


# ---------------------------------------------------------------- (a) throughput


def trial_throughput(work: Path, dataset: data.Dataset, size: int, batch: int, epochs: int) -> float:
    """Training images/s of the InceptionV3 head through trial.run (the code every trial uses)."""
    space = spaces.load("transfer")
    config = space.config({**space.defaults(), "input_size": size, "batch_size": batch})
    config.update(weights="none", patience=epochs + 1)
    parts = data.split(dataset, seed=28, test_per_class=8)
    uri = f"sqlite:///{work / 'a.db'}"
    client, experiment_id = tracking.connect(uri, "gpu-benchmark")
    run_id = tracking.create_run(client, experiment_id, "throughput", {})
    plan = trial.Plan(dataset, parts, data.class_weights(dataset.labels[parts.train], 3), str(work / "cache"),
                      "val_loss", 28)
    trial.run(trial.Spec("0", run_id, config, epochs, 0, str(work)), plan, tracking.writer(client, run_id))
    seconds = [m.value for m in MlflowClient(uri).get_metric_history(run_id, "train_seconds")][1:]
    return len(parts.train) / statistics.median(seconds)


def jitted_limit(n_images: int, size: int, batch: int, epochs: int) -> float:
    """Images/s of a compiled train step of the same model on data already on the device."""
    space = spaces.load("transfer")
    config = space.config({**space.defaults(), "input_size": size, "batch_size": batch})
    config["weights"] = "none"
    trial._set_precision("auto")
    model = models.build(config, 3)
    steps = n_images // batch
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (steps, batch, size, size, 3), dtype=np.uint8)
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, (steps, batch))]
    run_epoch = _jax_epoch(model, x, y) if keras.backend.backend() == "jax" else _tf_epoch(model, x, y)
    run_epoch()  # compile
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        run_epoch()
        times.append(time.perf_counter() - started)
    return steps * batch / statistics.median(times)


def _jax_epoch(model: keras.Model, x: np.ndarray, y: np.ndarray):
    import jax

    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    loss = keras.losses.CategoricalCrossentropy()

    def compute(trainable, non_trainable, xb, yb):
        pred, non_trainable = model.stateless_call(trainable, non_trainable, xb, training=True)
        return loss(yb, pred), non_trainable

    grad = jax.value_and_grad(compute, has_aux=True)

    @jax.jit
    def step(state, xb, yb):
        trainable, non_trainable, opt = state
        (_, non_trainable), grads = grad(trainable, non_trainable, xb, yb)
        trainable, opt = optimizer.stateless_apply(opt, grads, trainable)
        return trainable, non_trainable, opt

    xs, ys = jax.device_put(x), jax.device_put(y)
    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])

    def run_epoch() -> None:
        nonlocal state
        for i in range(xs.shape[0]):
            state = step(state, xs[i], ys[i])
        jax.block_until_ready(state)

    return run_epoch


def _tf_epoch(model: keras.Model, x: np.ndarray, y: np.ndarray):
    import tensorflow as tf

    loss = keras.losses.CategoricalCrossentropy()
    xs, ys = tf.constant(x), tf.constant(y)

    @tf.function(jit_compile=True)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            value = loss(yb, model(xb, training=True))
        model.optimizer.apply_gradients(zip(tape.gradient(value, model.trainable_variables),
                                            model.trainable_variables))

    def run_epoch() -> None:
        for i in range(x.shape[0]):
            step(xs[i], ys[i])

    return run_epoch


# ---------------------------------------------------------------- (b), (c) searches


def convnet_search(work: Path, data_root: Path, trials: int, workers: int, epochs: int, name: str) -> dict:
    """A vanilla search; returns wall time, trials/hour and each trial's fixed overhead."""
    uri = f"sqlite:///{work / (name + '.db')}"
    opts = search.Options(data=str(data_root), space="vanilla", tuner="random", max_trials=trials,
                          max_epochs=epochs, test_per_class=10, tracking_uri=uri, experiment=name,
                          project_dir=str(work / name), cache_dir=str(data_root / "cache"), resume="never",
                          progress="off", workers_per_gpu=workers, sets=["patience=100"])
    started = time.perf_counter()
    result = search.run(opts)
    wall = time.perf_counter() - started
    client, experiment_id = tracking.connect(uri, name, create=False)
    overheads = [_overhead(client, run) for run in tracking.trial_runs(client, result.search_run_id)
                 if run.info.status == "FINISHED"]
    return {"trials": trials, "workers": workers, "wall_s": wall, "trials_per_hour": trials / wall * 3600,
            "overhead_s": sorted(overheads)}


def _overhead(client: MlflowClient, run) -> float:
    """A trial's wall time minus its epochs at their steady-state length: what is not training."""
    epoch = [a.value + b.value for a, b in zip(client.get_metric_history(run.info.run_id, "train_seconds"),
                                               client.get_metric_history(run.info.run_id, "val_seconds"))]
    steady = statistics.median(epoch[1:] or epoch)
    return (run.info.end_time - run.info.start_time) / 1000 - steady * len(epoch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced mode (automatic without a GPU)")
    p.add_argument("--workers", type=int, default=4, help="N workers sharing the GPU in (c)")
    p.add_argument("--out", default="gpu-benchmark.json")
    args = p.parse_args()
    device = accelerator()
    quick = args.quick or not device.startswith("gpu")
    size, batch, per_class, epochs = (75, 8, 16, 2) if quick else (256, 64, 700, 4)
    trials, workers = (2, 2) if quick else (16, args.workers)
    figures = {"device": device, "mode": "reduced (CPU)" if quick else "full", "backend": keras.backend.backend(),
               "python": platform.python_version(),
               **{f"version.{p}": version(p) for p in ("keras", "keras-tuner", "mlflow-skinny", "numpy")}}
    print(json.dumps(figures, indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        big = make_data(work / "big", per_class, size)
        ours = trial_throughput(work, big, size, batch, epochs)
        limit = jitted_limit(len(big.samples) * 3 // 4, size, batch, epochs)
        figures["a"] = {"input_size": size, "batch_size": batch, "trial_images_per_s": ours,
                        "jitted_limit_images_per_s": limit, "fraction_of_limit": ours / limit, "target": 0.95}
        print(f"(a) trial path {ours:.0f} img/s, jitted limit {limit:.0f} img/s: {ours / limit:.1%} of the limit "
              "(target >= 95%)", flush=True)
        Path(args.out).write_text(json.dumps(figures, indent=1))  # kept if a later part runs out of time
        small = work / "small"
        make_data(small, 167 if not quick else 24, 64)
        one = convnet_search(work, small, trials, 1, epochs, "one")
        many = convnet_search(work, small, trials, workers, epochs, "many")
        overhead = statistics.median(one["overhead_s"])
        figures["b"] = {"median_overhead_s": overhead, "per_trial_s": one["overhead_s"], "target_s": 2.0}
        figures["c"] = {"one_worker": one, "n_workers": many, "speedup": many["trials_per_hour"] /
                        one["trials_per_hour"], "target": 3.0}
        print(f"(b) ConvNet per-trial fixed overhead: median {overhead:.2f} s (target <= 2 s); "
              f"each: {', '.join(f'{v:.2f}' for v in one['overhead_s'])}", flush=True)
        print(f"(c) ConvNet search: {one['trials_per_hour']:.0f} trials/h with 1 worker, "
              f"{many['trials_per_hour']:.0f} with {workers}: {figures['c']['speedup']:.2f}x (target >= 3x)")
    Path(args.out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
