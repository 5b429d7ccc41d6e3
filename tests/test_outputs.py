"""Outputs: the run recorder and the saved derived model round trip, and atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import arch_state, randomize_arch, tiny_space, x_batch

from fedmetanas_core.method.genotype import DiscreteNetwork, Genotype, SimpleCNN, derive_genotype
from fedmetanas_core.run import outputs as O
from fedmetanas_core.run.config import RunConfig
from fedmetanas_core.space import SearchModel
from fedmetanas_core.util import atomic as A

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_recorder_and_derived_model_round_trip(tmp_path):
    space = tiny_space(num_classes=4, in_channels=1)
    model = SearchModel(space)
    randomize_arch(model, seed=1)
    genotype = derive_genotype(space, arch_state(model))
    net = DiscreteNetwork.inherit(model, genotype).eval()
    rec = O.RunRecorder(tmp_path / "run")
    rec.write_config(dict(RunConfig.from_flat({})))
    rec.write_genotype(genotype)
    rec.log_round({"round": 1, "accuracy": 0.5})
    rec.log_round({"round": 2, "accuracy": 0.6})
    rec.write_summary({"best": 0.6})
    path = rec.save_model(net, space, genotype)
    assert path == tmp_path / "run" / O.MODEL_FILE
    loaded = O.load_derived_model(tmp_path / "run")
    assert isinstance(loaded, DiscreteNetwork) and loaded.genotype == genotype
    x = x_batch(c=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert Genotype.load_yaml(tmp_path / "run" / "genotype.yaml") == genotype
    assert len((tmp_path / "run" / "rounds.jsonl").read_text().splitlines()) == 2
    assert no_temp_files(tmp_path / "run")
    fresh = O.RunRecorder(tmp_path / "run")  # a new run into the same directory logs only its own rounds
    fresh.start_log()
    fresh.log_round({"round": 1, "accuracy": 0.7})
    assert [json.loads(ln)["accuracy"] for ln in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()] == [0.7]

    cnn = SimpleCNN(space).eval()
    rec2 = O.RunRecorder(tmp_path / "cnn")
    rec2.save_model(cnn, space, None)
    loaded2 = O.load_derived_model(tmp_path / "cnn" / O.MODEL_FILE)
    assert isinstance(loaded2, SimpleCNN)
    with torch.no_grad():
        torch.testing.assert_close(loaded2(x), cnn(x), rtol=0, atol=0)
    assert no_temp_files(tmp_path / "cnn")

    narrow = SimpleCNN(space, channels=3).eval()  # the parameter-matched baseline's width survives a save
    O.RunRecorder(tmp_path / "narrow").save_model(narrow, space, None)
    loaded3 = O.load_derived_model(tmp_path / "narrow")
    assert loaded3.channels == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded3(x), narrow(x), rtol=0, atol=0)


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    A.atomic_write_text(target, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(A.os, "replace", boom)
    with pytest.raises(OSError):
        A.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
