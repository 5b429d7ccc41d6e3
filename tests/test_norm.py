"""The ops' normalisation (``norm``): batch statistics (DARTS's) or one-group GroupNorm, per image.

What would break if ``group`` were wired wrong: an image's output would depend on the rest of its
batch (a BatchNorm left somewhere), the fast path would compute another function than the eager
one, the derived network, the CNN or the exported model would not follow the space, or a latency
table measured for one norm would be taken for the other.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from fedmetanas_core.deployment import export as E
from fedmetanas_core.deployment import predict as P
from fedmetanas_core.deployment.latency import space_signature
from fedmetanas_core.method.genotype import DiscreteNetwork, SimpleCNN, derive_genotype
from fedmetanas_core.run.config import RunConfig
from fedmetanas_core.run.config_keys import ConfigError
from fedmetanas_core.space import RelaxSettings, SearchModel, SpaceConfig, fast_path, is_arch

OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")

pytestmark = pytest.mark.usefixtures("single_thread")


def space(norm: str, search_norm: str = "") -> SpaceConfig:
    return SpaceConfig(
        num_classes=10,
        in_channels=1,
        init_channels=4,
        num_cells=2,
        num_nodes=2,
        stem_multiplier=2,
        primitives=OPS,
        norm=norm,
        search_norm=search_norm,
    )


def derived(norm: str, seed: int = 0, search_norm: str = "") -> DiscreteNetwork:
    torch.manual_seed(seed)
    model = SearchModel(space(norm, search_norm))
    with torch.no_grad():
        for p in model.arch.parameters():
            p.normal_()
    genotype = derive_genotype(model.space, {k: v for k, v in model.state_dict().items() if is_arch(k)})
    return DiscreteNetwork.inherit(model, genotype)


class Supernet(nn.Module):
    """The supernet under fixed relaxed weights (no Gumbel noise): a function of its input only."""

    def __init__(self, norm: str):
        super().__init__()
        torch.manual_seed(0)
        self.model = SearchModel(space(norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, RelaxSettings(noise=False, threshold=0.0))


def norm_kinds(net: nn.Module) -> set[type]:
    return {type(m) for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))}


@pytest.mark.parametrize("fast", [False, True])
def test_group_norm_networks_score_each_image_on_its_own(fast):
    """With ``group`` an image's logits do not depend on the other images in its batch (a class-skewed
    client batch and a balanced test batch normalise alike); with ``batch`` they do."""
    x = torch.randn(12, 1, 8, 8)
    for make in (Supernet, derived, lambda n: SimpleCNN(space(n))):
        with torch.no_grad(), fast_path(fast):
            grouped = make("group")
            together, alone = grouped(x)[:4], grouped(x[:4])
            torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
            batch = make("batch")
            assert not torch.allclose(batch(x)[:4], batch(x[:4]), atol=1e-3)
        assert norm_kinds(grouped) == {nn.GroupNorm} and norm_kinds(batch) == {nn.BatchNorm2d}


def test_group_norm_supernet_fast_path_equals_eager_with_gradients():
    model = Supernet("group")
    x = torch.randn(6, 1, 8, 8)
    outs = []
    for fast in (False, True):
        model.zero_grad()
        with fast_path(fast):
            loss = model(x).logsumexp(1).sum()
        loss.backward()
        outs.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-4, rtol=1e-4)
    assert len(outs[0][1]) == len(outs[1][1]) > 0
    for a, b in zip(outs[1][1], outs[0][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()) + 1e-7)


def test_group_norm_network_exports_and_the_file_reproduces_it(digits_test, tmp_path):
    """Nothing to calibrate: the exported model is the trained function, one image at a time too."""
    net = derived("group").eval()
    info = E.export_model(net, digits_test, tmp_path, normalization=([0.3], [0.37]), latency_runs=5)
    assert info["accuracy"]["torchscript_matches_eager"] == 1.0
    assert info["calibration"]["batchnorm_layers"] == 0 and "nothing calibrated" in info["accuracy"]["note"]
    assert info["onnx"] == "ok" or info["onnx"].startswith("skipped")
    loaded, _ = P.load_exported(tmp_path / P.TORCHSCRIPT_FILE)
    x = digits_test.x[:16]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(x[:1]), net(x)[:1], atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / P.EXPORT_JSON).read_text())["parameters"] == info["parameters"]


def test_the_norm_key_reaches_the_space_and_bad_values_name_it():
    from fedmetanas_core.method.training import space_from_config

    cfg = RunConfig.from_flat({"norm": "group"}, check_paths=False)
    assert space_from_config(cfg, 10, 1).norm == "group"
    assert space_from_config(RunConfig.from_flat({}, check_paths=False), 10, 1).norm == "batch"
    with pytest.raises(ConfigError, match="norm"):
        RunConfig.from_flat({"norm": "layer"}, check_paths=False)


def test_a_latency_table_is_for_one_norm():
    """A table keeps its signature for DARTS's BatchNorm (tables measured before the key stay
    valid) and names the norm otherwise, so a table of the other norm is refused."""
    batch, group = space_signature(space("batch"), (8, 8)), space_signature(space("group"), (8, 8))
    assert "norm" not in batch and group["norm"] == "group" and batch != group


def test_search_norm_searches_on_batch_statistics_and_derives_a_per_image_network():
    """``norm="group" search-norm="batch"``: the supernet (until the cell is decided) uses batch
    statistics, the derived network (the client's discrete-phase network, the server's evaluated
    and exported one) normalises per image, with the same state, so aggregation and checkpoints
    do not see the difference; a latency table is the derived network's, so it follows ``norm``."""
    mixed = space("group", "batch")
    assert norm_kinds(SearchModel(mixed).net) == {nn.BatchNorm2d}
    assert SearchModel(mixed).state_dict().keys() == SearchModel(space("group")).state_dict().keys()
    net = derived("group", search_norm="batch")
    assert norm_kinds(net) == {nn.GroupNorm}
    torch.testing.assert_close(net.state_dict(), derived("group").state_dict())
    x = torch.randn(12, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[:4], net(x[:4]), atol=1e-5, rtol=1e-5)
    assert space_signature(mixed, (8, 8)) == space_signature(space("group"), (8, 8))
    from fedmetanas_core.method.training import space_from_config

    cfg = RunConfig.from_flat({"norm": "group", "search-norm": "batch"}, check_paths=False)
    assert space_from_config(cfg, 10, 1).supernet_norm == "batch" and space_from_config(cfg, 10, 1).norm == "group"
    assert space_from_config(RunConfig.from_flat({}, check_paths=False), 10, 1).supernet_norm == "batch"
    with pytest.raises(ConfigError, match="search-norm"):
        RunConfig.from_flat({"search-norm": "layer"}, check_paths=False)


def test_fixbn_probe_statistics_reproduce_the_batch_they_were_measured_on():
    """benchmarks.fixbn_probe: statistics measured on one batch holding all data, then fixed, give that
    batch's outputs (every normalisation hooked, the fast path included); on a second batch they no
    longer follow it (a prediction independent of what else is in the batch)."""
    from types import SimpleNamespace

    from benchmarks.fixbn_probe import FixedStatsNorm, federation_statistics, fix_statistics, fixed_statistics_path
    from fedmetanas_core.data import ImageData

    net = derived("batch", seed=3)
    x = torch.randn(16, 1, 8, 8)
    client = SimpleNamespace(pool=ImageData(x, torch.zeros(16, dtype=torch.long), tuple("0123456789")))
    with fast_path(True), fixed_statistics_path(), torch.no_grad():
        before = net(x)
        stats = federation_statistics(net, [client], batch_size=16)
        norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(stats) == len(norms) > 0
        fix_statistics(net, stats)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        assert sum(isinstance(m, FixedStatsNorm) for m in net.modules()) == len(norms)
        assert torch.allclose(net(x), before, atol=1e-4)
        assert torch.allclose(net(x[:4]), before[:4], atol=1e-4)  # no longer depends on the batch
