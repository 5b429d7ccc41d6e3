"""Test environment: offline, no telemetry, one torch thread per process (2-core machines)."""

import os

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: tiny convs are ~100x slower when threads contend on a busy 2-core box,
    and CPU results must repeat bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def skip_run_extras(monkeypatch):
    """In-process runs whose test is about rounds and summaries: no device export and no figures
    (seconds of TorchScript and matplotlib per run; tests/test_simulation.py and test_export.py
    check those)."""
    import server_app.app as server

    monkeypatch.setattr(server, "_after_run", lambda *args: None)


@pytest.fixture
def flower_task_identity():
    """Flower messages can only be built inside a Flower runtime unless a task identity is set:
    tests that construct messages or run the ServerApp's loop in process set one (and restore it)."""
    from harness.local_grid import task_identity

    with task_identity():
        yield


@pytest.fixture
def torch_seed():
    """Each test starts from torch's global seed 0, whatever ran before it."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_data_caches(tmp_path, monkeypatch):
    """No in-process data caches before or after, and never a write to the user's cache dirs."""
    from fedmetanas_core import data as D

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    D.clear_caches()
    yield
    D.clear_caches()


@pytest.fixture(scope="module")
def digits_test():
    """sklearn's digits test split (8x8, offline), loaded once per module."""
    from fedmetanas_core.data import load_dataset

    return load_dataset("digits")[1]
