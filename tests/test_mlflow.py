"""MLflow tracking end to end: real bundle runs, a real SQLite store, a real MLflow server.

One short training and one evaluation (module fixture) are shared by the tests. Nothing of
MLflow is mocked: the runs are read back with ``MlflowClient``, through the REST API of an
``mlflow ui`` process started with the command ``ui_command`` prints, and a tracking server
is killed during a training to check that training survives it.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import html
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from monai_hsrdiff.bundle import BundleError
from monai_hsrdiff.diffusion import DiffusionSchedule, SelfRegulatedDiffusion, get_sampler
from monai_hsrdiff.networks import get_preset
from monai_hsrdiff.tracking import (
    check_tracking_store,
    count_parameters,
    kappa_curve_figure,
    local_artifact_root,
    local_tracking_uri,
    resolve_tracking_store,
    local_runs_url,
    runs_url,
    sample_grid_figure,
    ui_command,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MLFLOW = str(Path(PY).parent / "mlflow")
BUNDLE = REPO / "bundles" / "lidc"
TRAIN_CFG = f"['{BUNDLE / 'train.json'}','{BUNDLE / 'demo.json'}']"
EVAL_CFG = f"['{BUNDLE / 'train.json'}','{BUNDLE / 'evaluate.json'}','{BUNDLE / 'demo.json'}']"
# a 0.09M-parameter network at 32x32: 17 training items / batch 6 = 3 iterations per epoch
TINY = [
    "--image_size", "32", "--batch_size", "6",
    "--network_def#channels", "[8,8,16]", "--network_def#num_head_channels", "8", "--network_def#norm_num_groups", "4",
]  # fmt: skip
EPOCHS, ITERS_PER_EPOCH, VAL_STEPS = 2, 3, 2
LOSS_KEYS = ("loss", "loss_x0", "loss_eps", "loss_u", "kappa", "lr")
VAL_KEYS = ("val_ged16", "val_hm_iou16", "val_mdm16", "val_fused_iou16", "val_kappa_mean", "best_metric")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(root: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(HSRDIFF_RUN_ROOT=str(root / "runs"), HSRDIFF_DATA_ROOT=str(root / "data"), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _bundle(root: Path, run_id: str, *args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    cfg = TRAIN_CFG if run_id == "training" else EVAL_CFG
    cmd = [PY, "-m", "monai.bundle", "run", run_id, "--config_file", cfg, *TINY, *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(root, **env), capture_output=True, text=True, timeout=timeout)


def _png(client: MlflowClient, run_id: str, path: str, dst: Path) -> np.ndarray:
    local = client.download_artifacts(run_id, path, str(dst))
    img = np.asarray(Image.open(local).convert("RGB"))
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50 and img.std() > 0, path
    return img


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@contextlib.contextmanager
def _server(cmd: list[str], port: int, timeout: float = 120, env: dict | None = None):
    """Start an MLflow server process group; yield its base URL once /health answers; always stop it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
                raise AssertionError(f"MLflow server did not start on port {port}: {out[-2000:]}")
            time.sleep(0.5)
        yield proc, url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        proc.stdout.close()


def _rest(url: str, endpoint: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + endpoint, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> dict:
    """Demo data, a 2-epoch training on the default local store, and an evaluation that is
    pointed at a dead server with tracking_fallback_local=true (so it must land locally)."""
    root = tmp_path_factory.mktemp("mlflow")
    demo = subprocess.run(
        [PY, "-m", "preprocessing.demo", "--task", "lidc", "--out", str(root / "data" / "demo_lidc"), "--size", "32",
         "--num-items", "24"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr
    train = _bundle(root, "training", "--num_epochs", str(EPOCHS), "--val_interval", "1",
                    "--val_sampling_steps", str(VAL_STEPS), "--val_max_items", "2")  # fmt: skip
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    dead = f"http://127.0.0.1:{_free_port()}"
    evaluate = _bundle(root, "evaluating", "--eval_num_samples", "32", "--eval_sampling_steps", "2",
                       "--eval_max_items", "2", "--tracking_uri", dead, "--tracking_fallback_local", "True")  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-3000:]
    run_dir = root / "runs" / "lidc_demo"
    client = MlflowClient(local_tracking_uri(run_dir))
    exp = client.get_experiment_by_name("hsrdiff_lidc")
    runs = {r.data.tags["hsrdiff.role"]: r for r in client.search_runs([exp.experiment_id])}
    return dict(root=root, run_dir=run_dir, client=client, exp=exp, runs=runs, train=train, evaluate=evaluate, dead=dead)


def test_training_run_metrics_params_artifacts(tracked, tmp_path: Path) -> None:
    client, run_dir = tracked["client"], tracked["run_dir"]
    assert sorted(tracked["runs"]) == ["evaluation", "training"]
    run = client.get_run(tracked["runs"]["training"].info.run_id)
    rid = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "lidc_demo-training"
    assert tracked["exp"].artifact_location == Path(local_artifact_root(run_dir)).as_uri()
    # per-iteration loss terms and lr: one point per iteration, steps 1..6
    for key in LOSS_KEYS:
        assert _steps(client, rid, key) == list(range(1, EPOCHS * ITERS_PER_EPOCH + 1)), key
    lr = float(run.data.params["learning_rate"])  # constant schedule: every step logs the configured rate
    assert [m.value for m in client.get_metric_history(rid, "lr")] == pytest.approx([lr] * 6, rel=1e-6)
    # per-validation metrics: one point per epoch
    for key in VAL_KEYS:
        assert _steps(client, rid, key) == [1, 2], key
    # the kappa curve: one series per validation, step = the DDIM timesteps the sampler visits
    sampler = get_sampler("ddim", SelfRegulatedDiffusion(DiffusionSchedule(num_train_timesteps=250)))
    sampler.set_timesteps(VAL_STEPS)
    expected_t = sorted(int(t) for t in sampler.timesteps)
    for epoch in (1, 2):
        series = client.get_metric_history(rid, f"kappa_t/epoch_{epoch:04d}")
        assert sorted(m.step for m in series) == expected_t
        assert all(0.0 <= m.value <= 1.0 for m in series)
        mean = [m.value for m in client.get_metric_history(rid, "val_kappa_mean") if m.step == epoch][0]
        assert mean == pytest.approx(np.mean([m.value for m in series]), rel=1e-9)
        trace = json.loads(Path(client.download_artifacts(rid, f"kappa/kappa_trace_epoch_{epoch:04d}.json", str(tmp_path))).read_text())
        assert {int(t): v for t, v in trace.items()} == pytest.approx({m.step: m.value for m in series})
        _png(client, rid, f"kappa/kappa_curve_epoch_{epoch:04d}.png", tmp_path)
        grid = _png(client, rid, f"samples/samples_epoch_{epoch:04d}.png", tmp_path)
        # 2 rows (val_max_items) of 11 panels: image, 4 annotations, 4 samples, mean, entropy
        assert grid.shape[1] > 4 * grid.shape[0]
    # params: settings after the command-line overrides, model size, data set, code version
    p = run.data.params
    # (network_def names HSRDiff and writes every argument out; demo.json sets the demo widths)
    assert p["network_def/_target_"] == "monai_hsrdiff.networks.HSRDiff" and p["image_size"] == "32" and p["batch_size"] == "6"
    assert p["network_def/channels"] == "[8, 8, 16]" and p["network_def/num_res_blocks"] == "1" and p["learning_rate"] == "0.001"
    assert p["run_dir"] == str(run_dir.resolve()) and p["experiment_name"] == "hsrdiff_lidc"
    # keys written as expressions, logged with the values the run resolved (tracking_run#resolved)
    assert p["device"] == "cpu" and Path(p["ckpt_dir"]).resolve() == (run_dir / "checkpoints").resolve()
    assert Path(p["datalist"]).name == "datalist.json" and Path(p["datalist"]).parent == Path(p["dataset_dir"])
    net = get_preset("hsrdiff_light", in_channels=1, out_channels=1, channels=[8, 8, 16], num_head_channels=8,
                     norm_num_groups=4, attention_levels=[False, False, True], num_res_blocks=1)  # fmt: skip
    assert p["num_parameters"] == str(count_parameters(net))
    assert p["dataset_name"] == "lidc_demo" and p["dataset_synthetic"] == "True" and p["dataset_num_training"] == "17"
    assert p["max_epochs"] == str(EPOCHS) and p["epoch_length"] == str(ITERS_PER_EPOCH)
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", p["git_commit"])
    assert run.data.tags["mlflow.source.git.commit"] == p["git_commit"][:40]
    assert run.data.tags["hsrdiff.synthetic"] == "true" and "SYNTHETIC" in run.data.tags["mlflow.note.content"]
    # who ran which command (the UI's "Created by" and "Source"), and the data set as the run's input
    tags = run.data.tags
    assert tags["mlflow.user"] == getpass.getuser() and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] == str(BUNDLE / "train.json")
    assert shlex.split(tags["hsrdiff.command"])[:5] == ["python", "-m", "monai.bundle", "run", "training"]
    assert "--num_epochs" in shlex.split(tags["hsrdiff.command"])
    (inp,) = run.inputs.dataset_inputs
    datalist = Path(p["datalist"])
    assert (inp.dataset.name, inp.dataset.digest) == ("lidc_demo", hashlib.sha256(datalist.read_bytes()).hexdigest()[:8])
    assert json.loads(inp.dataset.source) == {"uri": str(datalist.parent.resolve())}
    assert json.loads(inp.dataset.profile) == {"num_training": 17, "num_validation": int(p["dataset_num_validation"]),
                                               "num_test": int(p["dataset_num_test"]), "synthetic": True}  # fmt: skip
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "training"}
    # the merged config (files + overrides) as an artifact
    cfg = json.loads(Path(client.download_artifacts(rid, "config/bundle_config.json", str(tmp_path))).read_text())
    assert cfg["image_size"] == 32 and cfg["network_def"]["num_res_blocks"] == 1 and cfg["network_def"]["channels"] == [8, 8, 16]
    # the best checkpoint (the bundle's model file) and the bundle metadata, byte for byte
    logged = Path(client.download_artifacts(rid, "model/model.pt", str(tmp_path)))
    assert logged.read_bytes() == (run_dir / "checkpoints" / "model.pt").read_bytes()
    net.load_state_dict(torch.load(logged, map_location="cpu", weights_only=True))  # strict: every weight
    meta = Path(client.download_artifacts(rid, "model/metadata.json", str(tmp_path)))
    assert meta.read_bytes() == (BUNDLE / "metadata.json").read_bytes()
    # the run prints the command that opens the UI on this store
    assert ui_command(run_dir) in tracked["train"].stdout


def test_evaluation_run_nested_and_fallback(tracked, tmp_path: Path) -> None:
    client, run_dir = tracked["client"], tracked["run_dir"]
    run = client.get_run(tracked["runs"]["evaluation"].info.run_id)
    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    # the dead server was reported, and the run went to the local store instead
    assert tracked["dead"] in tracked["evaluate"].stderr and "tracking_fallback_local is true" in tracked["evaluate"].stderr
    assert run.data.tags["hsrdiff.tracking_source"] == "fallback"
    # nested under the training run of the same run directory
    assert run.data.tags["mlflow.parentRunId"] == tracked["runs"]["training"].info.run_id
    # the logged metrics are the numbers the evaluation wrote to metrics.json, named by the split
    # (test_*); metrics.json keeps the val_* keys as deprecated aliases with the same values
    written = json.loads((run_dir / "eval" / "metrics.json").read_text())
    named = {k: v for k, v in written.items() if k.startswith("test_")}
    assert {"test_ged16", "test_hm_iou16", "test_ged32", "test_hm_iou32"} <= set(named) <= set(run.data.metrics)
    assert {k for k in written if not k.startswith("test_")} == {"val_" + k.removeprefix("test_") for k in named}
    assert not [k for k in run.data.metrics if k.startswith("val_")]  # val_* is validation during training only
    for k, v in named.items():
        assert written["val_" + k.removeprefix("test_")] == v
        assert run.data.metrics[k] == pytest.approx(v, rel=1e-6), k
        assert _steps(client, rid, k) == [1]
    assert run.data.params["eval_num_samples"] == "32" and run.data.params["eval_split"] == "test"
    (inp,) = run.inputs.dataset_inputs  # the same data set, used for its test split
    assert inp.dataset.name == "lidc_demo" and {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "test"}
    assert run.data.tags["mlflow.source.name"] == str(BUNDLE / "train.json") and "evaluating" in run.data.tags["hsrdiff.command"]
    assert Path(run.data.params["eval_dir"]).resolve() == (run_dir / "eval").resolve()
    assert len(_steps(client, rid, "kappa_t")) == 2
    _png(client, rid, "kappa/kappa_curve_eval.png", tmp_path)
    _png(client, rid, "samples/samples_eval.png", tmp_path)
    csv = Path(client.download_artifacts(rid, "eval/metrics.csv", str(tmp_path))).read_text()
    assert "val_ged32" in csv


def _plain_env() -> dict:
    """The environment of a plain shell: no virtual environment active, the venv's bin not on PATH."""
    venv_bin = Path(PY).parent.resolve()
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV" and not k.startswith("MLFLOW_")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != venv_bin)
    return env


def test_ui_command_serves_the_run(tracked) -> None:
    """The printed UI command, run as printed in a plain shell (no venv), serves over REST what the
    UI shows at the printed runs URL: the experiment, both runs nested, metric histories, params, artifacts."""
    run_dir, exp_id = tracked["run_dir"], tracked["exp"].experiment_id
    train_id, eval_id = tracked["runs"]["training"].info.run_id, tracked["runs"]["evaluation"].info.run_id
    # both runs end by printing the command and the direct URL of the runs view
    for out in (tracked["train"].stdout, tracked["evaluate"].stdout):
        assert f"open the MLflow UI: {ui_command(run_dir)}\n" in out
        assert f"browse the runs: http://127.0.0.1:5000/#/experiments/{exp_id}/runs?viewStateShareKey=hsrdiff\n" in out
    # what scripts/demo.sh prints: the same address, found in the run folder's store
    assert local_runs_url(run_dir, "hsrdiff_lidc") == runs_url(exp_id, view=True)
    assert local_runs_url(run_dir, "no_such_experiment") is None and local_runs_url(run_dir.parent / "none", "x") is None
    port = _free_port()
    line = ui_command(run_dir, port=port)
    assert shlex.split(line)[:2] == [MLFLOW, "ui"]  # the venv's own mlflow, by absolute path
    env = _plain_env()
    assert shutil.which("mlflow", path=env["PATH"]) != MLFLOW and "VIRTUAL_ENV" not in env
    with _server(["bash", "-c", "exec " + line], port, env=env) as (_, url):
        assert runs_url(exp_id, port) == f"{url}/#/experiments/{exp_id}/runs"
        with urllib.request.urlopen(url + "/", timeout=30) as r:  # the UI page the URL's fragment routes in
            assert r.status == 200 and b"<html" in r.read(2000).lower()
        exp = _rest(url, f"/api/2.0/mlflow/experiments/get?experiment_id={exp_id}")["experiment"]
        assert exp["name"] == "hsrdiff_lidc"
        found = _rest(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
        by_id = {r["info"]["run_id"]: r for r in found}
        assert set(by_id) == {train_id, eval_id}
        tags = {rid: {t["key"]: t["value"] for t in r["data"]["tags"]} for rid, r in by_id.items()}
        assert tags[eval_id]["mlflow.parentRunId"] == train_id and "mlflow.parentRunId" not in tags[train_id]
        assert tags[train_id]["hsrdiff.role"] == "training" and tags[eval_id]["hsrdiff.role"] == "evaluation"
        keys = {rid: {m["key"] for m in r["data"]["metrics"]} for rid, r in by_id.items()}
        assert set(LOSS_KEYS) | set(VAL_KEYS) <= keys[train_id]
        assert {"test_ged16", "test_hm_iou16", "test_ged32", "eval_kappa_mean"} <= keys[eval_id]
        assert not [k for k in keys[eval_id] if k.startswith("val_")]

        def history(rid: str, key: str) -> list[int]:
            q = f"/api/2.0/mlflow/metrics/get-history?run_id={rid}&metric_key={key}"
            return sorted(int(m["step"]) for m in _rest(url, q)["metrics"])

        for key in LOSS_KEYS:  # one point per iteration
            assert history(train_id, key) == list(range(1, EPOCHS * ITERS_PER_EPOCH + 1)), key
        for key in VAL_KEYS:  # one point per validation (val_interval 1)
            assert history(train_id, key) == list(range(1, EPOCHS + 1)), key
        assert history(eval_id, "test_ged16") == [1]
        metrics = {m["key"]: m["value"] for m in by_id[train_id]["data"]["metrics"]}
        assert metrics["val_ged16"] == pytest.approx(tracked["runs"]["training"].data.metrics["val_ged16"])
        params = {rid: {p["key"]: p["value"] for p in r["data"]["params"]} for rid, r in by_id.items()}
        assert params[train_id]["image_size"] == "32" and params[train_id]["max_epochs"] == str(EPOCHS)
        assert params[train_id]["resume"] == "False"  # a fresh run says so
        assert params[eval_id]["eval_split"] == "test" and params[eval_id]["eval_num_samples"] == "32"

        def listing(rid: str, path: str = "") -> set[str]:
            q = f"/api/2.0/mlflow/artifacts/list?run_id={rid}" + (f"&path={path}" if path else "")
            return {f["path"] for f in _rest(url, q).get("files", [])}

        assert {"config", "kappa", "model", "samples"} <= listing(train_id)
        assert {f"kappa/kappa_curve_epoch_{e:04d}.png" for e in range(1, EPOCHS + 1)} <= listing(train_id, "kappa")
        assert {f"samples/samples_epoch_{e:04d}.png" for e in range(1, EPOCHS + 1)} == listing(train_id, "samples")
        assert {"model/model.pt", "model/metadata.json"} <= listing(train_id, "model")
        assert {"eval", "kappa", "samples"} <= listing(eval_id)
        assert "samples/samples_eval.png" in listing(eval_id, "samples")
        # the artifacts the UI shows come through the same server
        with urllib.request.urlopen(f"{url}/get-artifact?path=kappa/kappa_curve_epoch_0002.png&run_uuid={train_id}", timeout=30) as r:
            img = Image.open(io.BytesIO(r.read()))
            assert img.format == "PNG" and img.size[0] > 100


def test_source_tags_name_the_bundle_command(tmp_path) -> None:
    """The first --config_file is the source (absolute), the whole line a tag, no file read; another
    script keeps MLflow's own source name."""
    from monai_hsrdiff.tracking import source_tags

    main = str(Path("/venv/lib/python3.11/site-packages/monai/bundle/__main__.py"))
    cfg = f"['{BUNDLE / 'train.json'}','{BUNDLE / 'demo.json'}']"
    tags = source_tags([main, "run", "training", "--config_file", cfg, "--num_epochs", "3"])
    assert tags["mlflow.source.name"] == str(BUNDLE / "train.json") and tags["mlflow.user"] == getpass.getuser()
    assert shlex.split(tags["hsrdiff.command"]) == ["python", "-m", "monai.bundle", "run", "training", "--config_file", cfg, "--num_epochs", "3"]
    missing = source_tags([main, "run", "training", "--config_file", str(tmp_path / "nope.json")])  # never opened
    assert missing["mlflow.source.name"] == str(tmp_path / "nope.json")
    assert source_tags([main, "run", "training", "--args_file", "a.json"]).get("hsrdiff.command") is None
    script = source_tags([str(tmp_path / "my_script.py")])  # not the bundle command: MLflow's defaults
    assert "hsrdiff.command" not in script and script["mlflow.source.type"] == "LOCAL"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _rendered_text(url: str) -> str:
    """The text of ``url`` as a person sees it: the page rendered by headless Chromium (the UI's
    React app fetches the run over REST) in a 1600x1000 window (the runs table draws only the columns
    that fit), scripts and tags stripped, whitespace folded."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-background-networking", "--window-size=1600,1000", "--virtual-time-budget=30000", "--dump-dom", url]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and "<html" in done.stdout.lower(), done.stderr[-2000:]
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", done.stdout, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_ui_pages_in_chromium(tracked) -> None:
    """The MLflow UI as a browser renders it: each run page shows who ran it, the bundle config and
    commit, the data set with its digest and use, its metrics; the runs table lists the training with
    its data set and source."""
    run_dir, exp_id = tracked["run_dir"], tracked["exp"].experiment_id
    runs = {role: tracked["client"].get_run(r.info.run_id) for role, r in tracked["runs"].items()}
    digest = runs["training"].inputs.dataset_inputs[0].dataset.digest
    commit = runs["training"].data.tags["mlflow.source.git.commit"][:7]
    port = _free_port()
    with _server(["bash", "-c", "exec " + ui_command(run_dir, port=port)], port) as (_, url):
        page = {role: _rendered_text(f"{url}/#/experiments/{exp_id}/runs/{r.info.run_id}") for role, r in runs.items()}
        table = _rendered_text(runs_url(exp_id, port, view=True))
        plain = _rendered_text(runs_url(exp_id, port))
    for role, context, metric in (("training", "training", "val_ged16"), ("evaluation", "test", "test_ged16")):
        text = page[role]
        assert f"lidc_demo-{role}" in text, text[:3000]
        assert re.search(rf"Created by {re.escape(getpass.getuser())}\b", text), text[:3000]
        assert re.search(rf"Source train\.json {commit}\b", text), text[:3000]
        assert re.search(rf"Datasets lidc_demo \({digest}\) {context}\b", text, re.I), text[:3000]
        assert metric in text and "SYNTHETIC" in text
    assert "Parent run lidc_demo-training" in page["evaluation"] and "Child runs lidc_demo-evaluation" in page["training"]
    # MLflow's default table: no metric column, the evaluation folded under its training
    assert re.search(rf"lidc_demo-training .*lidc_demo \({digest}\) Training .*train\.json", plain, re.I), plain[:3000]
    assert "val_ged16" not in plain and "lidc_demo-evaluation" not in plain
    # the printed address (the bundles' shared view): the metric columns, both runs flat, each with its values
    metrics = {role: r.data.metrics for role, r in runs.items()}
    # the header groups' text comes in either DOM order; the cells below always read metrics, then params
    metric_cols, param_cols = "test_ged16 test_hm_iou16 val_ged16 val_hm_iou16 ", "prediction preset "
    header = re.search(
        rf"Run Name Created (Metrics |Parameters )*Duration ({metric_cols}{param_cols}|{param_cols}{metric_cols})", table
    )
    assert header and "Sort: Run Name" in table and "viewing a shared view" in table, table[:3000]
    rows = table[header.end():]
    assert rows.index("lidc_demo-evaluation") < rows.index("lidc_demo-training"), rows[:2000]

    def shown(value: float) -> str:  # the UI prints the float's shortest repr
        return repr(float(value))

    for key in ("test_ged16", "test_hm_iou16"):
        assert shown(metrics["evaluation"][key]) in rows, (key, rows[:2000])
    for key in ("val_ged16", "val_hm_iou16"):
        assert shown(metrics["training"][key]) in rows, (key, rows[:2000])


def test_unreachable_store_stops_before_training(tracked) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    out = _bundle(tracked["root"], "training", "--run_name", "deadstore", "--tracking_uri", dead, timeout=180)
    assert out.returncode == 2
    assert f"ERROR: the MLflow tracking store {dead}" in out.stderr
    assert "--tracking_fallback_local True" in out.stderr and "Traceback" not in out.stderr
    run_dir = tracked["root"] / "runs" / "lidc_deadstore"
    assert not list(run_dir.rglob("*.pt")) and not (run_dir / "mlflow.db").exists()


def _logs_loss(body: bytes) -> bool:
    try:
        req = json.loads(body or b"{}")
    except ValueError:
        return False
    return req.get("key") == "loss" or any(m.get("key") == "loss" for m in req.get("metrics", []))


@contextlib.contextmanager
def _killing_proxy(target: str, server: subprocess.Popen):
    """An HTTP proxy to ``target`` that SIGKILLs the server's process group, and stops
    listening, as soon as it has forwarded the first request that logs ``loss``. The server
    so dies at a known point of the training however loaded the machine is (polling the
    server for the first loss and then killing it raced a fast training to its end)."""
    killed = threading.Event()

    class Forward(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if killed.is_set():
                self.close_connection = True  # a dead server answers nothing
                return
            req = urllib.request.Request(target + self.path, data=body if self.command != "GET" else None,
                                         method=self.command, headers={"Content-Type": "application/json"})  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    status, reply, ctype = r.status, r.read(), r.headers.get("Content-Type", "application/json")
            except urllib.error.HTTPError as e:
                status, reply, ctype = e.code, e.read(), e.headers.get("Content-Type", "application/json")
            if self.command == "POST" and "/runs/log-" in self.path and _logs_loss(body):
                os.killpg(server.pid, signal.SIGKILL)
                killed.set()
                threading.Thread(target=httpd.shutdown, daemon=True).start()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = do_PATCH = do_DELETE = _forward

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", killed
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_server_dies_mid_training(tracked, tmp_path: Path) -> None:
    """A real tracking server is killed right after the first logged loss: training finishes,
    warns, and its checkpoints are complete; the server's store holds the part logged before."""
    store = tmp_path / "server"
    store.mkdir()
    shutil.copy(tracked["run_dir"] / "mlflow.db", store / "mlflow.db")  # already migrated: fast start
    port = _free_port()
    cmd = [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
           "--default-artifact-root", (store / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with _server(cmd, port) as (server, server_url), _killing_proxy(server_url, server) as (url, killed):
        out = subprocess.run(
            [PY, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN_CFG, *TINY, "--run_name", "midrun",
             "--num_epochs", "2", "--val_interval", "5", "--tracking_uri", url],
            cwd=REPO, env=_env(tracked["root"], MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
        )  # fmt: skip
        assert killed.is_set(), "training logged no loss through the proxy: " + out.stdout[-3000:]
        assert server.wait(timeout=15) == -signal.SIGKILL
    assert out.returncode == 0, out.stdout[-3000:]
    assert f"MLflow tracking to {url} failed" in out.stdout and "Training continues" in out.stdout
    ckpt = tracked["root"] / "runs" / "lidc_midrun" / "checkpoints" / f"resume_checkpoint_{EPOCHS * ITERS_PER_EPOCH}.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["trainer"]["iteration"] == EPOCHS * ITERS_PER_EPOCH and "network" in state and "optimizer" in state
    # what reached the server before it died is in its store: the first iteration, no later one
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("hsrdiff_lidc").experiment_id
    run = client.search_runs([exp_id], filter_string="tags.`hsrdiff.run_dir` LIKE '%lidc_midrun'")[0]
    assert _steps(client, run.info.run_id, "loss") == [1] and run.info.status == "RUNNING"


def test_store_resolution_precedence(tracked, monkeypatch) -> None:
    run_dir, local = tracked["run_dir"], local_tracking_uri(tracked["run_dir"])
    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_store(run_dir).uri == local and resolve_tracking_store(run_dir).source == "local"
    # the bundle key beats the environment variable (the dead env server is never contacted)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    store = resolve_tracking_store(run_dir, tracking_uri=local)
    assert (store.uri, store.source) == (local, "config")
    # the variable beats the default; unreachable without fallback: a clean stop naming it
    with pytest.raises(BundleError, match=re.escape(dead)):
        resolve_tracking_store(run_dir)
    fb = resolve_tracking_store(run_dir, fallback_local=True)
    assert (fb.uri, fb.source, fb.is_local) == (local, "fallback", True)


def test_check_store_rejects_bad_stores(tmp_path: Path) -> None:
    bad = tmp_path / "notadb.db"
    bad.write_text("this is not sqlite")
    with pytest.raises(ConnectionError, match="not an SQLite database"):
        check_tracking_store(f"sqlite:///{bad}")
    with pytest.raises(ConnectionError, match="file store"):
        check_tracking_store(str(tmp_path / "mlruns"))


def test_runs_view_is_merged_and_optional(tracked, tmp_path: Path, caplog) -> None:
    """The bundles' runs-table view: the runs wrote it (val and test columns, run-name sort); an
    evaluation of another split adds its columns and keeps the others; an unchanged view is not
    rewritten; a store that fails costs a warning and False, and the address then has no view key."""
    from monai_hsrdiff.tracking import ensure_runs_view, runs_view_state
    from monai_hsrdiff.tracking.runs_view import VIEW_TAG, has_runs_view

    stored = json.loads(tracked["client"].get_experiment(tracked["exp"].experiment_id).tags[VIEW_TAG])
    assert stored == runs_view_state(("test",)) and stored["orderByKey"] == "tags.`mlflow.runName`"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.create_experiment("views")
    assert not has_runs_view(client.get_experiment(exp_id))
    assert ensure_runs_view(client, exp_id) and has_runs_view(client.get_experiment(exp_id))
    first = json.loads(client.get_experiment(exp_id).tags[VIEW_TAG])["selectedColumns"]
    assert first == [f"metrics.`{s}_{m}`" for s in ("val", "test") for m in ("ged16", "hm_iou16")] + ["params.`preset`", "params.`prediction`"]
    assert ensure_runs_view(client, exp_id, "holdout")
    merged = json.loads(client.get_experiment(exp_id).tags[VIEW_TAG])["selectedColumns"]
    assert merged == first[:4] + ["metrics.`holdout_ged16`", "metrics.`holdout_hm_iou16`"] + first[4:]
    updated = client.get_experiment(exp_id).last_update_time
    assert ensure_runs_view(client, exp_id)  # a training after it keeps the holdout columns, writes nothing
    assert json.loads(client.get_experiment(exp_id).tags[VIEW_TAG])["selectedColumns"] == merged
    assert client.get_experiment(exp_id).last_update_time == updated
    client.set_experiment_tag(exp_id, VIEW_TAG, "not json")  # a damaged tag is replaced by the view
    assert ensure_runs_view(client, exp_id) and json.loads(client.get_experiment(exp_id).tags[VIEW_TAG]) == runs_view_state()
    with caplog.at_level("WARNING", logger="monai_hsrdiff.tracking"):
        assert ensure_runs_view(client, "999999") is False
    assert "could not save the runs-table view on experiment 999999" in caplog.text


def test_figures_check_their_inputs() -> None:
    with pytest.raises(ValueError, match="kappa_trace is empty"):
        kappa_curve_figure({})
    fig = kappa_curve_figure({0: 0.9, 124: 0.5, 249: 0.2}, num_train_timesteps=250)
    ax = fig.axes[0]
    assert ax.get_xlim() == (0.0, 250.0) and ax.get_ylim() == (0.0, 1.0)
    assert list(ax.lines[-1].get_xdata()) == [0, 124, 249]  # t ascending, left to right as in Figure 6
    z = torch.zeros
    with pytest.raises(ValueError, match="one K"):
        sample_grid_figure(z(2, 1, 8, 8), z(3, 4, 8, 8), z(2, 16, 8, 8), z(2, 8, 8), z(2, 8, 8))
    fig = sample_grid_figure(z(2, 1, 8, 8), z(2, 4, 8, 8), z(2, 16, 8, 8), z(2, 8, 8), z(2, 8, 8), num_samples=3)
    assert len(fig.axes) == 2 * (1 + 4 + 3 + 2) + 2  # and the colour bars of mean and entropy


CRASH_SCRIPT = """
import sys
from ignite.engine import Engine
from monai_hsrdiff.tracking import HSRDiffMLFlowHandler, scalar_output

def step(engine, batch):
    if engine.state.iteration == 3:
        raise RuntimeError("simulated crash in iteration 3")
    return {"loss": 1.0 / engine.state.iteration}

trainer = Engine(step)
HSRDiffMLFlowHandler(sys.argv[1], role="training", tracking_uri=sys.argv[2], experiment_name="crash",
                     output_transform=scalar_output(["loss"])).attach(trainer)
trainer.run(range(5), max_epochs=1)
"""


def test_crashed_training_run_is_marked_failed(tracked, tmp_path: Path) -> None:
    """A training that dies with an exception leaves its run FAILED (exit hook), not RUNNING."""
    db = tmp_path / "mlflow.db"
    shutil.copy(tracked["run_dir"] / "mlflow.db", db)
    uri = f"sqlite:///{db}"
    out = subprocess.run([PY, "-c", CRASH_SCRIPT, str(tmp_path / "run"), uri], cwd=REPO, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode != 0 and "simulated crash in iteration 3" in out.stderr
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("crash").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)] == [1.0, 0.5]


def test_resumed_training_continues_its_run(tracked) -> None:
    # LAST in this module: it adds an epoch to the shared fixture's training run
    client, root = tracked["client"], tracked["root"]
    rid = tracked["runs"]["training"].info.run_id
    res = _bundle(root, "training", "--num_epochs", str(EPOCHS + 1), "--resume", "True", "--val_interval", "1",
                  "--val_sampling_steps", str(VAL_STEPS), "--val_max_items", "2")  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"continuing MLflow run {rid}" in res.stdout
    runs = client.search_runs([tracked["exp"].experiment_id], filter_string="tags.`hsrdiff.role` = 'training'")
    assert [r.info.run_id for r in runs] == [rid]  # no second training run
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.data.tags["hsrdiff.resumed_at_iteration"] == str(EPOCHS * ITERS_PER_EPOCH)
    # one step axis across the restart: iterations 1..9, validations at epochs 1..3
    assert _steps(client, rid, "loss") == list(range(1, (EPOCHS + 1) * ITERS_PER_EPOCH + 1))
    assert _steps(client, rid, "val_ged16") == [1, 2, 3]
    assert run.data.params["max_epochs"] == str(EPOCHS)  # params stay those of the first start (immutable)


def test_handlers_share_only_their_tracking_run(tracked, tmp_path: Path) -> None:
    """The validation handler logs into the training run of the TrackingRun it holds, not into
    another run of the same run directory in the same process (no module-level state)."""
    from ignite.engine import Engine, Events

    from monai_hsrdiff.tracking import HSRDiffMLFlowHandler, TrackingRun, scalar_output

    db = tmp_path / "mlflow.db"
    shutil.copy(tracked["run_dir"] / "mlflow.db", db)  # already migrated: fast
    uri = f"sqlite:///{db}"
    ours, other = (TrackingRun(str(tmp_path / "run"), tracking_uri=uri, experiment_name="share") for _ in range(2))
    with pytest.raises(ValueError, match="needs the training handler's TrackingRun"):
        HSRDiffMLFlowHandler(str(tmp_path / "run"), role="validation", tracking_uri=uri)

    def evaluator(run: TrackingRun, value: float) -> Engine:
        engine = Engine(lambda e, b: {})
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_x=value))
        HSRDiffMLFlowHandler(run, role="validation", iteration_log=False).attach(engine)
        return engine

    mine, stray = evaluator(ours, 1.0), evaluator(other, 2.0)
    trainer = Engine(lambda e, b: {"loss": 0.5})
    HSRDiffMLFlowHandler(ours, role="training", output_transform=scalar_output(["loss"])).attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: (mine.run([0]), stray.run([0])))
    trainer.run([0, 1], max_epochs=1)
    assert other.run_id is None and ours.role == "training"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("share").experiment_id])
    assert [r.info.run_id for r in runs] == [ours.run_id]  # the stray validation opened no run of its own
    assert [m.value for m in client.get_metric_history(ours.run_id, "val_x")] == [1.0]
    assert _steps(client, ours.run_id, "loss") == [1, 2]


def test_sample_grid_marks_empty_readers_on_every_row() -> None:
    """A reader who drew nothing is marked "(empty)" in whichever row it happens (row 2 here)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    label = torch.ones(3, 4, 8, 8)
    label[1, 2] = 0  # row 2, annotation 3: empty
    z = torch.zeros
    fig = sample_grid_figure(z(3, 1, 8, 8), label, z(3, 4, 8, 8), z(3, 8, 8), z(3, 8, 8), num_samples=2)
    FigureCanvasAgg(fig).draw()  # the titles render
    cols = 1 + 4 + 2 + 2
    titles = [[fig.axes[r * cols + c].get_title() for c in range(cols)] for r in range(3)]
    assert titles[0][:5] == ["image", "annotation 1", "annotation 2", "annotation 3", "annotation 4"]
    assert titles[1] == [""] * 3 + ["annotation 3 (empty)"] + [""] * (cols - 4)
    assert titles[2] == [""] * cols
    texts = [t.get_text() for ax in fig.axes for t in ax.texts] + [ax.get_title() for ax in fig.axes]
    assert sum("(empty)" in t for t in texts) == 1


def test_sample_grid_has_colour_bars_for_mean_and_entropy() -> None:
    """The mean and entropy columns carry one colour bar each, under the last row, on the fixed
    scales every row is drawn with: 0-1 and 0-1 bit for a binary task, 0-log2(3) bits for 3 classes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    z = torch.zeros
    for classes, top in ((2, 1.0), (3, float(np.log2(3)))):
        label = torch.full((3, 2, 8, 8), classes - 1.0)
        fig = sample_grid_figure(z(3, 1, 8, 8), label, z(3, 4, 8, 8), z(3, 8, 8), torch.rand(3, 8, 8), num_samples=2)
        FigureCanvasAgg(fig).draw()
        panels, bars = fig.axes[: 3 * 7], fig.axes[3 * 7 :]
        assert len(bars) == 2, [a.get_label() for a in fig.axes]
        labels = [b.get_xlabel() for b in bars]
        assert labels == (["fraction of samples", "bits"] if classes == 2 else ["mean class", "bits"])
        assert bars[1].get_xlim() == pytest.approx((0.0, top))
        if classes == 2:
            assert bars[0].get_xlim() == pytest.approx((0.0, 1.0))
        # every row's entropy panel uses the bar's scale
        assert all(ax.images[0].get_clim() == pytest.approx((0.0, top)) for ax in panels[6::7])
        # the bars sit below the last row of panels
        last_row_bottom = min(ax.get_position().y0 for ax in panels[-7:])
        assert all(b.get_position().y1 <= last_row_bottom + 1e-6 for b in bars)


def test_kappa_label_is_mathtext() -> None:
    """κ_φ is typeset as κ with subscript φ (mathtext), not written with a literal underscore."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.mathtext import MathTextParser

    fig = kappa_curve_figure({0: 0.9, 249: 0.2}, num_train_timesteps=250)
    ax = fig.axes[0]
    for text in (ax.get_ylabel(), ax.get_title()):
        assert r"$\kappa_\phi$" in text and "κ_φ" not in text, text
        MathTextParser("agg").parse(text[text.index("$") :])  # valid mathtext
    FigureCanvasAgg(fig).draw()


def test_description_warns_once(tracked) -> None:
    """The run description of a SYNTHETIC data set warns once, in both runs (the demo data set's own
    description opens with the warning; no second one is put in front of it)."""
    for role in ("training", "evaluation"):
        note = tracked["client"].get_run(tracked["runs"][role].info.run_id).data.tags["mlflow.note.content"]
        assert note.startswith("SYNTHETIC images: demo data") and note.count("demo data") == 1, (role, note)


def test_demo_resumes_only_a_run_with_checkpoints(tracked, tmp_path: Path) -> None:
    """scripts/demo.sh passes --resume True only when the run folder holds a resume checkpoint."""

    def resume_args(run_dir: Path) -> str:
        cmd = ["bash", "-c", 'source scripts/demo.sh && resume_args "$1"', "_", str(run_dir)]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert resume_args(tmp_path / "fresh") == ""
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    (tmp_path / "fresh" / "checkpoints" / "model.pt").write_bytes(b"")
    assert resume_args(tmp_path / "fresh") == ""  # only resume checkpoints count
    assert list((tracked["run_dir"] / "checkpoints").glob("resume_checkpoint_*.pt"))
    assert resume_args(tracked["run_dir"]) == "--resume True"


def test_training_registers_its_model(tracked, tmp_path: Path) -> None:
    """The best checkpoint of a training is an MLflow model in the Model Registry, named after the
    experiment, tagged with its validation GED, with the network and sampler of the run (issue 18)."""
    import mlflow

    client, rid = tracked["client"], tracked["runs"]["training"].info.run_id
    versions = sorted((v for v in client.search_model_versions("name = 'hsrdiff_lidc'") if v.run_id == rid), key=lambda v: int(v.version))
    assert versions, client.search_model_versions("")
    # the fixture's training registered the first version; a resumed training (another test) continues the
    # run, logs a new model/model.pt and registers its own version: the last one goes with that artifact
    first, last = versions[0], versions[-1]
    history = client.get_metric_history(rid, "val_ged16")
    for v, points in ((first, [m for m in history if m.step <= EPOCHS]), (last, history)):
        best = min(points, key=lambda m: (m.value, m.step))
        assert float(v.tags["val_ged16"]) == pytest.approx(best.value, rel=1e-5) and v.tags["val_epoch"] == str(best.step)
    out = tracked["train"].stdout
    assert f"registered MLflow model hsrdiff_lidc version {first.version} (val_ged16 " in out
    assert f"{MLFLOW} models serve -m models:/hsrdiff_lidc/{first.version} --env-manager local" in out
    with mlflow.tracking._tracking_service.utils._use_tracking_uri(local_tracking_uri(tracked["run_dir"])):  # + the registry
        model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/hsrdiff_lidc/{last.version}", dst_path=str(tmp_path / "m")))
    # its weights are the run's model/model.pt (the bundle's model file, still logged as before)
    bundle_file = Path(client.download_artifacts(rid, "model/model.pt", str(tmp_path)))
    a, b = (torch.load(p, weights_only=True) for p in (bundle_file, model_dir / "artifacts" / "model.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    settings = json.loads((model_dir / "artifacts" / "settings.json").read_text())
    params = client.get_run(rid).data.params
    assert settings["network"]["channels"] == [8, 8, 16] and settings["image_size"] == 32
    assert (settings["sampler"], settings["num_inference_steps"], settings["num_samples"]) == (
        params["val_sampler"], VAL_STEPS, int(params["val_num_samples"]))


def test_readme_images_come_from_the_evaluation_run(tracked, tmp_path: Path) -> None:
    """scripts/readme_images.py copies the evaluation run's own figures, byte for byte, and --check sees a change."""
    out = tmp_path / "img"
    cmd = [PY, str(REPO / "scripts" / "readme_images.py"), "--run-dir", str(tracked["run_dir"]), "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    eval_id = tracked["runs"]["evaluation"].info.run_id
    for artifact, name in (("samples/samples_eval.png", "samples"), ("kappa/kappa_curve_eval.png", "kappa")):
        logged = Path(tracked["client"].download_artifacts(eval_id, artifact, str(tmp_path / name)))
        assert (out / f"demo_lidc_{name}.png").read_bytes() == logged.read_bytes()
    assert f"run {eval_id}: test_ged16 " in done.stdout
    assert subprocess.run([*cmd, "--check"], cwd=REPO, capture_output=True, timeout=120).returncode == 0
    (out / "demo_lidc_kappa.png").write_bytes(b"stale")
    check = subprocess.run([*cmd, "--check"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and "DIFFERS" in check.stdout and (out / "demo_lidc_kappa.png").read_bytes() == b"stale"
    missing = subprocess.run([*cmd[:3], str(tmp_path / "nothing"), "--out", str(out)], cwd=REPO, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert missing.returncode != 0 and "mlflow.db does not exist" in missing.stderr
