"""Device export: BatchNorm calibration, TorchScript file, export.json and fedmetanas-predict.

A tiny derived network on sklearn's digits (8x8, offline) keeps every test to about a second; one
test starts a fresh interpreter to run the predict command as a device would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fedmetanas_core.deployment import export as E
from fedmetanas_core.deployment import predict as P
from fedmetanas_core.method.genotype import DiscreteNetwork, SimpleCNN, derive_genotype
from fedmetanas_core.space import SearchModel, SpaceConfig, is_arch

OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_space(test) -> SpaceConfig:
    return SpaceConfig(
        num_classes=test.num_classes,
        in_channels=test.in_channels,
        init_channels=4,
        num_cells=2,
        num_nodes=2,
        stem_multiplier=2,
        primitives=OPS,
    )


@pytest.fixture(scope="module")
def derived_net(digits_test):
    """A derived network: genotype from random architecture logits, weights inherited."""
    torch.manual_seed(0)
    space = tiny_space(digits_test)
    model = SearchModel(space)
    with torch.no_grad():
        for p in model.arch.parameters():
            p.normal_()
    genotype = derive_genotype(space, {k: v for k, v in model.state_dict().items() if is_arch(k)})
    return DiscreteNetwork.inherit(model, genotype).eval()


def digits_config(path: Path) -> None:
    """The run config the ServerApp writes first; export uses it to recompute the normalisation."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(
        yaml.safe_dump({"dataset": "digits", "data-dir": "", "image-size": 0, "test-subset": 0, "seed": 0})
    )


def test_calibrated_batchnorm_reproduces_batch_statistics_and_is_batch_independent(derived_net, digits_test):
    x = digits_test.x
    calib, held = E.calibration_split(len(x))
    assert len(calib) == len(x) // 2 and len(set(calib.tolist()) & set(held.tolist())) == 0
    model = E.calibrate_batchnorm(derived_net, x[calib])
    assert not E.batch_stat_norms(model), "every batch-statistics BatchNorm must be replaced"
    assert E.batch_stat_norms(derived_net), "the original network must be left untouched"
    with torch.no_grad():
        # on the calibration batch the calibrated net is the batch-statistics net
        torch.testing.assert_close(model(x[calib]), derived_net(x[calib]), atol=1e-4, rtol=1e-4)
        # one image at a time == the whole batch at once (the original net cannot even do batch 1)
        batch = model(x[held[:20]])
        single = torch.cat([model(x[i : i + 1]) for i in held[:20].tolist()])
    torch.testing.assert_close(single, batch, atol=1e-5, rtol=1e-5)


def test_export_writes_torchscript_matching_the_calibrated_network(derived_net, digits_test, tmp_path):
    digits_config(tmp_path)
    info = E.export_model(derived_net, digits_test, tmp_path, latency_runs=10)

    ts = tmp_path / P.TORCHSCRIPT_FILE
    assert ts.is_file()
    on_disk = json.loads((tmp_path / P.EXPORT_JSON).read_text())
    assert on_disk == json.loads(json.dumps(info))
    assert info["files"][P.TORCHSCRIPT_FILE] == ts.stat().st_size
    assert info["parameters"] == sum(p.numel() for p in derived_net.parameters())
    assert info["latency_ms_per_image"]["median"] > 0 and info["latency_ms_per_image"]["runs"] == 10
    assert info["input"]["image_size"] == [8, 8] and info["input"]["in_channels"] == 1
    assert info["input"]["normalization_source"] == "ImageData.mean/std"
    assert info["classes"] == list(digits_test.classes)
    assert info["onnx"] == "ok" or info["onnx"].startswith("skipped")
    assert 0.0 <= info["accuracy"]["heldout"] <= 1.0 and info["accuracy"]["torchscript_matches_eager"] == 1.0
    assert info["calibration"]["max_abs_logit_diff_on_calibration_batch"] < 1e-3

    # the normalisation stored is the one the data pipeline applied (train statistics of digits)
    from sklearn.datasets import load_digits

    raw = load_digits().images / 16.0  # all of digits; the stored mean is the train split's
    assert info["input"]["mean"][0] == pytest.approx(float(raw.mean()), abs=0.02)

    # same predictions as the in-memory calibrated network, on the whole test set
    calib, _ = E.calibration_split(len(digits_test))
    eager = E.calibrate_batchnorm(derived_net, digits_test.x[calib])
    loaded, meta = P.load_exported(ts)
    assert meta["input"]["mean"] == info["input"]["mean"] and meta["classes"] == info["classes"]
    with torch.no_grad():
        want, got = eager(digits_test.x), loaded(digits_test.x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.argmax(1), want.argmax(1))
    acc = float((got.argmax(1) == digits_test.y).float().mean())
    assert info["accuracy"]["test"] == pytest.approx(acc)


def test_export_simple_cnn_with_explicit_normalization(digits_test, tmp_path):
    torch.manual_seed(1)
    net = SimpleCNN(tiny_space(digits_test))
    info = E.export_model(net, digits_test, tmp_path, normalization=([0.3], [0.37]), latency_runs=5)
    assert info["input"]["mean"] == [0.3] and info["input"]["normalization_source"].startswith("export_model")
    assert info["derived_model"] is None  # no derived_model.pt in this directory
    with pytest.raises(ValueError, match="channel"):
        E.export_model(net, digits_test, tmp_path, normalization=([0.3, 0.3], [0.3, 0.3]), latency_runs=5)


def write_pngs(folder: Path, count: int) -> list[tuple[Path, int]]:
    """The first digits test images as 8-bit grayscale PNGs (some in a sub-folder), with labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    _, test_idx = train_test_split(np.arange(len(bunch.target)), test_size=0.2, stratify=bunch.target, random_state=0)
    out = []
    for k, i in enumerate(np.sort(test_idx)[:count]):
        sub = folder / ("nested" if k % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{k}.png"
        Image.fromarray((bunch.images[i] / 16.0 * 255).round().astype(np.uint8), mode="L").save(path)
        out.append((path, int(bunch.target[i])))
    return out


def test_preprocess_matches_the_training_pipeline(derived_net, digits_test, tmp_path):
    digits_config(tmp_path)
    info = E.export_model(derived_net, digits_test, tmp_path, latency_runs=3)
    images = write_pngs(tmp_path / "imgs", 4)
    for k, (path, label) in enumerate(images):
        x = P.preprocess(path, info["input"])
        assert x.shape == (1, 1, 8, 8)
        assert int(digits_test.y[k]) == label
        # only PNG's 8-bit rounding separates a file from the training tensor
        torch.testing.assert_close(x[0], digits_test.x[k], atol=2.5 / 255 / info["input"]["std"][0], rtol=0)


@pytest.mark.slow  # the predict CLI in a subprocess
def test_predict_command_in_a_fresh_process(derived_net, digits_test, tmp_path):
    run_dir = tmp_path / "run"
    digits_config(run_dir)
    E.export_model(derived_net, digits_test, run_dir, latency_runs=3)
    images = write_pngs(tmp_path / "images", 5)
    (tmp_path / "images" / "notes.txt").write_text("not an image")

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmetanas_core.deployment.predict",
            str(run_dir / P.TORCHSCRIPT_FILE),
            str(tmp_path / "images"),
            "--classes-from",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(images)
    model, meta = P.load_exported(run_dir)
    by_path = {}
    for line in lines:
        path, label, latency = line.split("\t")
        assert label in digits_test.classes
        assert latency.endswith(" ms") and float(latency[:-3]) > 0
        by_path[path] = label
    for path, _ in images:  # the subprocess predicts what the model predicts on the same file
        with torch.no_grad():
            k = int(model(P.preprocess(path, meta["input"])).argmax(1))
        assert by_path[str(path)] == digits_test.classes[k]
    assert "median" in proc.stderr


def test_predict_errors_are_clear(derived_net, digits_test, tmp_path, capsys):
    assert P.predict_main([str(tmp_path / "missing.pt"), str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    digits_config(tmp_path)
    E.export_model(derived_net, digits_test, tmp_path, latency_runs=3)
    assert P.predict_main([str(tmp_path), str(tmp_path / "no-such-folder")]) == 2
    assert "image folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert P.predict_main([str(tmp_path), str(tmp_path / "empty")]) == 2
    assert "no .png" in capsys.readouterr().err
    assert P.predict_main([str(tmp_path), str(tmp_path), "--classes-from", str(tmp_path / "nowhere")]) == 2
    assert "--classes-from" in capsys.readouterr().err
