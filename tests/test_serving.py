"""Issue #13: the champion any MLflow client can use: base64 image files in, class names and probabilities out."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from conftest import cli
from covidsearch import inference, registry, serving, tracking

CLASSES = ["COVID-19", "Normal", "Viral Pneumonia"]
CHAMPION = "models:/covid-cxr@champion"


@pytest.fixture(scope="module")
def champion(xray_dir, tmp_path_factory):
    """A real 1-trial search on generated images (input 32 px), its trial promoted to covid-cxr@champion."""
    work = tmp_path_factory.mktemp("serving")
    result = cli("run", "--space", "vanilla", "--data", str(xray_dir), "--tuner", "random", "--max-trials", "1",
                 "--max-epochs", "1", "--set", "input_size=32", "--test-per-class", "8", "--quiet", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    client = registry.connect(uri)
    search = tracking.latest_search(client, client.get_experiment_by_name("covidsearch").experiment_id)
    run_id = tracking.leaderboard(client, search)[0]["run_id"]
    registry.promote(client, run_id)
    return SimpleNamespace(work=work, uri=uri, run_id=run_id)


@pytest.fixture(scope="module")
def served(champion):
    """The champion as any MLflow client loads it."""
    mlflow.set_tracking_uri(champion.uri)
    return mlflow.pyfunc.load_model(CHAMPION)


def encoded(path: Path, fmt: str = "PNG") -> str:
    """An image file as a client sends it: the file's bytes, base64-encoded (re-encoded as `fmt`)."""
    buffer = io.BytesIO()
    Image.open(path).save(buffer, fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def check_answer(answer: pd.DataFrame, rows: int) -> None:
    """One row per image: the predicted class name, then each class's probability, summing to 1."""
    assert list(answer.columns) == ["predicted", *CLASSES] and len(answer) == rows
    probs = answer[CLASSES].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert list(answer["predicted"]) == [CLASSES[i] for i in probs.argmax(axis=1)]


def test_the_champion_is_a_pyfunc_that_takes_base64_png_and_jpeg_files(champion, served, xray_dir):
    assert served.metadata.signature.inputs.to_dict() == [{"type": "string", "name": "image", "required": True}]
    assert served.metadata.metadata == {"classes": CLASSES, "input_size": 32, "color_mode": "rgb"}

    scan = xray_dir / "COVID-19" / "COVID-19-0.png"
    answer = served.predict(pd.DataFrame({"image": [encoded(scan), encoded(scan, "JPEG"), encoded(scan)]}))
    check_answer(answer, 3)
    # the same pixels as `covidsearch predict` feeds the model: the file through data.decode
    expected = inference.probabilities(inference.load(CHAMPION, champion.uri), [scan])[0]
    np.testing.assert_allclose(answer.loc[0, CLASSES].to_numpy(dtype=float), expected, atol=1e-6)


def test_uint8_arrays_of_any_size_are_resized_as_training_resized_files(served, tmp_path):
    classifier = served.unwrap_python_model()  # arrays go to the model itself: the signature takes files
    pixels = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)  # not the model's 32x32
    Image.fromarray(pixels).save(tmp_path / "scan.png")

    one = classifier.predict(None, pixels)
    batch = classifier.predict(None, np.stack([pixels, pixels[::-1]]))
    from_file = classifier.predict(None, [encoded(tmp_path / "scan.png")])
    check_answer(one, 1)
    check_answer(batch, 2)
    pd.testing.assert_frame_equal(one, from_file)
    pd.testing.assert_frame_equal(one, batch.iloc[:1])


@pytest.mark.parametrize("sent, message", [
    (np.full((1, 32, 32, 3), 0.5, dtype=np.float32), "float32 pixels; send uint8 pixels 0..255"),
    (np.full((32, 32, 3), 300), "pixel values 300..300 are outside 0..255"),
    (["not base64!"], "image 0: not base64"),
    ([base64.b64encode(b"a text file").decode()], "image 0: not a PNG or JPEG file"),
    (pd.DataFrame({"file": ["x"]}), "no 'image' column in the request"),
])
def test_what_is_not_an_image_or_uint8_pixels_is_refused(served, sent, message):
    with pytest.raises(MlflowException, match=message) as refused:
        served.unwrap_python_model().predict(None, sent)
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"  # HTTP 400 from the scoring server


def test_an_operating_point_threshold_calls_covid_from_that_probability(served, xray_dir):
    scan = encoded(xray_dir / "NORMAL" / "NORMAL-0.png")
    classifier = serving.Classifier(CLASSES, 32, "rgb", threshold=0.0)  # every image reaches it
    classifier.model = served.unwrap_python_model().model
    assert list(classifier.predict(None, [scan, scan])["predicted"]) == ["COVID-19", "COVID-19"]


def test_trial_models_still_load_as_keras_for_predict_evaluate_and_warm_starts(champion):
    mlflow.set_tracking_uri(champion.uri)
    model = tracking.load_keras(CHAMPION)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 3)
    loaded = inference.load(champion.run_id, champion.uri)
    assert (loaded.classes, loaded.size, loaded.color_mode) == (CLASSES, 32, "rgb")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    """The HTTP status and JSON answer of a POST, as any client sees them."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def children(pid: int) -> list[int]:
    """The processes `pid` started (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError):
            pass  # the process ended while being read
    return found


def group_ends(group: int, seconds: float = 15) -> bool:
    """Whether every process of the group is gone within `seconds` (a server finishes its shutdown)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_covidsearch_serve_answers_both_request_formats_and_its_server_ends_with_it(champion, xray_dir):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    serve = subprocess.Popen([sys.executable, "-m", "covidsearch.cli", "serve", "--port", str(port),
                              "--tracking-uri", champion.uri], cwd=champion.work, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        ready = next((line for line in serve.stdout if line.startswith("serving ")), "")
        url = f"http://127.0.0.1:{port}/invocations"
        assert ready.startswith(f"serving covid-cxr version 1 at {url} ") and "curl" in ready, ready
        (server,) = children(serve.pid)

        png = encoded(xray_dir / "COVID-19" / "COVID-19-0.png")
        jpeg = encoded(xray_dir / "NORMAL" / "NORMAL-0.png", "JPEG")
        for body in ({"inputs": [png, jpeg]}, {"dataframe_records": [{"image": png}, {"image": jpeg}]}):
            status, answer = post(url, body)
            assert status == 200, answer
            check_answer(pd.DataFrame(answer["predictions"]), 2)

        status, answer = post(url, {"inputs": ["bm90IGFuIGltYWdl"]})  # base64, but of text
        assert status == 400 and "image 0: not a PNG or JPEG file" in answer["message"]
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
    assert group_ends(server)  # the scoring server and the uvicorn it started
