"""benchmarks.bound and benchmarks.profile_run: the recording, its replay and the phase of a round."""

import collections

import pytest
import torch
import torch.nn.functional as F

from benchmarks.bound import (
    Recorder,
    batched_args,
    bound_table,
    flops_of,
    load_calls,
    make_arg,
    phase_of,
    save_calls,
)


def _record() -> collections.Counter:
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    lin = torch.randn(10, 5 * 8 * 8, requires_grad=True)
    with Recorder() as rec:
        y = F.linear(F.conv2d(x, w, padding=1).flatten(1), lin)
        y.sum().backward()
    return rec.calls


def test_recording_counts_the_convolution_and_matrix_calls_of_a_step():
    calls = _record()
    names = collections.Counter(f.overloadpacket.__name__ for f, _ in calls.elements())
    assert names["convolution"] == 1 and names["convolution_backward"] == 1
    assert names["mm"] >= 2  # forward product and the weight gradient


def test_replayed_calls_count_the_flops_of_the_originals_and_scale_with_the_batch(tmp_path):
    calls = _record()
    rows = [{"round": 1, "calls": calls}]
    save_calls(rows, tmp_path / "calls.json")
    loaded = load_calls(tmp_path / "calls.json")[0]["calls"]
    assert sum(loaded.values()) == sum(calls.values())
    ((conv, spec),) = [(f, s) for f, s in loaded if f.overloadpacket.__name__ == "convolution"]
    flops = flops_of(conv, tuple(make_arg(s) for s in spec))
    assert flops == 2 * 4 * 5 * 8 * 8 * 3 * 3 * 3  # 2 x batch x out channels x pixels x in channels x kernel
    assert flops_of(conv, batched_args(conv, spec, 16)) == 16 * flops
    for func, call in loaded:  # every call, the products of the backward pass too (one has an expanded gradient)
        assert flops_of(func, batched_args(func, call, 16)) == 16 * flops_of(func, tuple(make_arg(s) for s in call))


def test_a_round_runs_under_the_masks_the_previous_round_left():
    assert phase_of({}) == "full supernet"
    assert phase_of({"pruned-fraction": 0.0, "cell-decided": False}) == "full supernet"
    assert phase_of({"pruned-fraction": 0.4, "cell-decided": False}) == "pruning"
    assert phase_of({"pruned-fraction": 0.9, "cell-decided": True}) == "discrete cell"


def test_the_bound_table_divides_the_rounds_time_by_its_bound():
    rows = [{"round": 1, "calls": _record()}, {"round": 2, "calls": _record()}]
    measured = {1: {"round-s": 1.0, "client-s-sum": 1.0}, 2: {"round-s": 2.0, "client-s-sum": 2.0}}
    lines, out = bound_table(rows, measured, cores=2)
    assert [r["round"] for r in out] == [1, 2]
    assert out[0]["gflop"] == out[1]["gflop"] > 0
    assert 0 < out[0]["bound_sustained_s"] and out[1]["round_s"] == 2.0
    assert "round / sustained bound" in lines[0]


def test_profile_run_writes_one_runs_results_where_asked_and_refuses_it_for_several(tmp_path, monkeypatch):
    import benchmarks.profile_run as profile_run

    seen = []

    def fake_profile(items, out, cores, plain_flwr=False):  # only where the results go is under test here
        seen.append(out)
        return {"total": 1.0, "parts": {"start-up": 0.5}, "phases": {}, "accuracy": 0.5}

    monkeypatch.setattr(profile_run, "profile", fake_profile)
    profile_run.main(["--results-dir", str(tmp_path / "seed-0"), "--json", str(tmp_path / "t.json")])
    assert seen == [(tmp_path / "seed-0").resolve()]
    with pytest.raises(SystemExit) as err:
        profile_run.main(["--results-dir", str(tmp_path / "x"), "--runs", "2"])
    assert err.value.code == 2
