"""The trained model in the MLflow Model Registry, and served: real SQLite store, real ``mlflow models serve``.

A tiny HSRDiff with a real checkpoint file is logged and registered once (module fixture) through
``monai_hsrdiff.tracking.pyfunc_model``; no bundle training. The tests load it back by its
``models:/<name>/<version>`` URI in-process and through the REST ``/invocations`` endpoint of a
real ``mlflow models serve`` process, and compare the answers with the sampling pipeline run
directly (HSRDiffPipeline, the same seed). The training handler's part (log + register at the end
of a training, failure tolerant) runs on a one-iteration ignite engine.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from mlflow import MlflowClient

from monai_hsrdiff.diffusion import DiffusionSchedule, HSRDiffPipeline, SelfRegulatedDiffusion, get_sampler
from monai_hsrdiff.networks import HSRDiff
from monai_hsrdiff.tracking import HSRDiffMLFlowHandler, TrackingRun, scalar_output
from monai_hsrdiff.tracking.pyfunc_model import MODEL_NAME, ServedModel

MLFLOW = str(Path(sys.executable).parent / "mlflow")
SIZE, T, STEPS, ETA = 32, 50, 2, 1.0
NET = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": [8, 16, 32], "num_res_blocks": 1,
       "attention_levels": [False, False, True], "norm_num_groups": 8, "num_head_channels": 8}  # fmt: skip
NAME = "hsrdiff_test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_network(seed: int = 0) -> HSRDiff:
    torch.manual_seed(seed)
    net = HSRDiff(**NET)
    with torch.no_grad():  # non-trivial weights: the zero-initialised convolutions too
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def _served(net: HSRDiff) -> ServedModel:
    return ServedModel(net, SelfRegulatedDiffusion(DiffusionSchedule(T)), "ddim", STEPS, ETA, num_samples=4, seed=0, image_size=SIZE)


def _reference(net: HSRDiff, images: np.ndarray, num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """The pipeline run directly; mean and entropy written out here (not through the module)."""
    pipe = HSRDiffPipeline(net, get_sampler("ddim", SelfRegulatedDiffusion(DiffusionSchedule(T)), eta=ETA, num_inference_steps=STEPS))
    out = pipe(torch.from_numpy(images), num_samples=num_samples, generator=torch.Generator().manual_seed(seed))
    masks = (out.samples[:, :, 0] > 0).numpy()  # (B, N, H, W)
    p = masks.mean(axis=1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nan_to_num(p * np.log2(p)) - np.nan_to_num((1 - p) * np.log2(1 - p))
    return {"samples": masks.astype(np.uint8), "mean": p, "entropy": h}


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == {"samples", "mean", "entropy"}
    samples = np.asarray(got["samples"])
    assert samples.shape == want["samples"].shape
    np.testing.assert_array_equal(samples, want["samples"])
    np.testing.assert_allclose(np.asarray(got["mean"], dtype=np.float64), want["mean"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["entropy"], dtype=np.float64), want["entropy"], atol=1e-5)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny network's checkpoint logged into a training-like run and registered (version 1)."""
    tmp = tmp_path_factory.mktemp("registry")
    net = _tiny_network()
    weights = tmp / "model.pt"
    torch.save(net.state_dict(), weights)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(NAME, artifact_location=(tmp / "mlartifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    for step, ged in ((1, 0.7), (2, 0.4), (3, 0.6)):  # the best validation is epoch 2
        client.log_metric(run_id, "val_ged16", ged, step=step)
    served = _served(net)
    served.weights = str(weights)
    version = served.log_training_run(uri, run_id, NAME)
    client.set_terminated(run_id)
    rng = np.random.default_rng(0)
    images = np.clip(rng.normal(0.0, 0.5, (2, 1, SIZE, SIZE)), -1, 1).astype(np.float32)
    return {"uri": uri, "net": net, "version": version, "run_id": run_id, "experiment": exp, "images": images, "tmp": tmp}


def test_registered_with_validation_ged(registered) -> None:
    v = registered["version"]
    client = MlflowClient(registered["uri"])
    assert (v.name, str(v.version)) == (NAME, "1")
    got = client.get_model_version(NAME, "1")
    assert got.tags["val_ged16"] == "0.4" and got.tags["val_epoch"] == "2"
    assert got.run_id == registered["run_id"] and got.status == "READY"
    # a LoggedModel of the run's experiment (MLflow's "Logged models" tab), with the weights and settings
    (logged,) = client.search_logged_models(experiment_ids=[registered["experiment"]])
    assert logged.name == MODEL_NAME and logged.source_run_id == registered["run_id"]
    assert logged.params["sampler"] == "ddim" and logged.params["num_inference_steps"] == str(STEPS)
    files = {a.path for a in client.list_logged_model_artifacts(logged.model_id)}
    assert {"MLmodel", "input_example.json", "serving_input_example.json"} <= files
    with mlflow.tracking._tracking_service.utils._use_tracking_uri(registered["uri"]):
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"))
    settings = json.loads((local / "artifacts" / "settings.json").read_text())
    assert settings["network"] == {**NET, "num_res_blocks": [1, 1, 1], "num_head_channels": [8, 8, 8], "prediction": "srdiff", "condition": "hierarchical",
                                   "decoder_skips": True, "phi_channels": [8, 16, 32], "use_flash_attention": True, "norm_eps": 1e-6}  # fmt: skip
    assert settings["diffusion"]["num_train_timesteps"] == T and settings["num_inference_steps"] == STEPS
    state = torch.load(local / "artifacts" / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in registered["net"].state_dict().items())
    # the signature: a (-1, 1, 32, 32) float32 tensor in, params num_samples and seed
    meta = mlflow.models.Model.load(str(local))
    assert json.loads(meta.signature.inputs.to_json())[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 1, SIZE, SIZE]}
    assert {p.name: p.default for p in meta.signature.params} == {"num_samples": 4, "seed": 0}


def test_pyfunc_predict_equals_pipeline(registered) -> None:
    """load_model -> predict in-process: the samples of HSRDiffPipeline for the same seed, exactly."""
    with mlflow.tracking._tracking_service.utils._use_tracking_uri(registered["uri"]):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    images, net = registered["images"], registered["net"]
    got = model.predict(images, params={"num_samples": 3, "seed": 7})
    _assert_same(got, _reference(net, images, 3, 7))
    assert got["samples"].dtype == np.uint8 and got["mean"].dtype == got["entropy"].dtype == np.float32
    assert 0 < got["samples"].mean() < 1  # masks with both values: the comparison is not trivial
    _assert_same(model.predict(images[:1]), _reference(net, images[:1], 4, 0))  # the params' defaults
    other = model.predict(images[:1], params={"num_samples": 3, "seed": 8})["samples"]
    assert not np.array_equal(other, got["samples"][:1])  # the seed is used
    with pytest.raises(Exception, match="shape"):
        model.predict(np.zeros((1, 1, 16, 16), np.float32))


def test_served_invocations_equal_pipeline(registered) -> None:
    """``mlflow models serve -m models:/<name>/1 --env-manager local``: one item over REST /invocations."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # MLflow starts `uvicorn` by name: the venv's bin must be on PATH (as the printed command sets it)
    env.update(MLFLOW_TRACKING_URI=registered["uri"], PATH=f"{Path(MLFLOW).parent}{os.pathsep}{env.get('PATH', '')}")
    cmd = [MLFLOW, "models", "serve", "-m", f"models:/{NAME}/1", "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    log = open(registered["tmp"] / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(base + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert proc.poll() is None, "mlflow models serve exited:\n" + (registered["tmp"] / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no /ping answer in 90 s:\n" + (registered["tmp"] / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        image = registered["images"][:1]
        body = json.dumps({"inputs": image.tolist(), "params": {"num_samples": 3, "seed": 11}}).encode()
        req = urllib.request.Request(base + "/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        _assert_same(answer["predictions"], _reference(registered["net"], image, 3, 11))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def _train_one_iteration(tmp_path: Path, served: ServedModel, weights: Path) -> tuple[TrackingRun, str]:
    """The training handler on a one-iteration engine: val_ged16 logged during the epoch, the model at the end."""
    run = TrackingRun(str(tmp_path / "run"), experiment_name="hsrdiff_handler", task="lidc")
    engine = Engine(lambda e, b: {"loss": 0.5})
    handler = HSRDiffMLFlowHandler(run, role="training", output_transform=scalar_output(["loss"]),
                                   optimizer_param_names=[], artifacts={"model": [str(weights)]}, served_model=served)  # fmt: skip
    handler.attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: run.client.log_metric(run.run_id, "val_ged16", 0.25, step=1))
    engine.run([0], max_epochs=1)
    return run, run.run_id


def test_training_handler_registers_and_tolerates_failure(tmp_path, caplog) -> None:
    net = _tiny_network(1)
    weights = tmp_path / "model.pt"
    torch.save(net.state_dict(), weights)
    served = _served(net)
    served.weights = str(weights)
    run, run_id = _train_one_iteration(tmp_path, served, weights)
    client = run.client
    (version,) = client.search_model_versions("name = 'hsrdiff_handler'")
    assert version.run_id == run_id and version.tags["val_ged16"] == "0.25"
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id, "model")} == {"model/model.pt"}  # the contract stays
    # a registry failure (here: the weights are gone) warns; the run still ends FINISHED
    served.weights = str(tmp_path / "missing.pt")
    with caplog.at_level(logging.WARNING, logger="monai_hsrdiff.tracking"):
        run, run_id = _train_one_iteration(tmp_path / "second", served, weights)
    assert any("registered model" in r.getMessage() and "missing.pt" in r.getMessage() for r in caplog.records)
    assert run.client.get_run(run_id).info.status == "FINISHED"
    assert run.client.search_model_versions("name = 'hsrdiff_handler'") == []  # its own store: nothing registered
    assert {a.path for a in run.client.list_artifacts(run_id, "model")} == {"model/model.pt"}
