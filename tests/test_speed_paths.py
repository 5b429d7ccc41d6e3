"""The fast forward path (space.fast_path, the default) computes what the plain eager
reference path computes: same outputs, same gradients (first and second order), same ops run.
Tiny spaces and 8x8 inputs keep it fast; float64 checks the algebra tightly, float32 the real
kernels (channels_last, oneDNN) within float tolerance."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_arch, tiny_space

from fedmetanas_core import space as S
from fedmetanas_core.method.genotype import DiscreteNetwork, SimpleCNN, derive_genotype
from fedmetanas_core.method.maml import InnerLoop, fomaml_task_gradient, second_order_task_gradient
from fedmetanas_core.names import KNOWN_OPS, NORMS
from fedmetanas_core.space import RelaxSettings, SearchModel, SpaceConfig, arch_param_name, is_arch, kernels, make_op

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


@pytest.fixture(autouse=True)
def _restore_switch():
    before = S.fast_path_enabled()
    yield
    S.set_fast_path(before)


def batch(n=6, size=8, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).to(dtype), torch.randint(0, 5, (n,), generator=g)


def masks_for(space: SpaceConfig, model: SearchModel, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for t in ("normal", "reduce"):
        shape = model.arch.alpha[t].shape
        m = torch.rand(shape, generator=g) > 0.3
        m[:, 4] = True  # a real op on every edge
        masks[arch_param_name("alpha", t)] = m
    return masks


def task_gradient(model, fast: bool, order: int = 1, seed: int = 0, dtype=torch.float32, **fw):
    """One local-search task exactly as training runs it: K=1 inner step, then the query gradient."""
    with S.fast_path(fast):
        params = dict(model.named_parameters())
        inner = InnerLoop(1, 0.1, 0.05)
        fn = second_order_task_gradient if order == 2 else fomaml_task_gradient
        generator = torch.Generator().manual_seed(seed)
        grads, loss = fn(
            model, params, batch(seed=1, dtype=dtype), batch(seed=2, dtype=dtype), inner, generator=generator, **fw
        )
    return grads, loss


def assert_dicts_close(a, b, rtol, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


# =============================================================================================
# Depthwise convolution with the rewritten gradients


DW_CASES = [(k, d, s) for k in (3, 5) for d in (1, 2) for s in (1, 2)]


@pytest.mark.parametrize("k,d,s", DW_CASES)
@pytest.mark.parametrize("size", [8, 7])
def test_depthwise_conv_gradients_equal_autograd(k, d, s, size):
    c = 3
    x = torch.randn(2, c, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, 1, k, k, dtype=torch.float64, requires_grad=True)
    p = d * (k - 1) // 2
    g = torch.randn_like(F.conv2d(x, w, None, s, p, d, c))
    ref = torch.autograd.grad(F.conv2d(x, w, None, s, p, d, c), (x, w), g)
    out = kernels.DepthwiseConv.apply(x, w, s, p, d)
    torch.testing.assert_close(out, F.conv2d(x, w, None, s, p, d, c))
    got = torch.autograd.grad(out, (x, w), g)
    for a, b in zip(got, ref, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k,d,s", [(5, 1, 1), (3, 2, 1), (5, 2, 2), (3, 1, 2)])
def test_depthwise_conv_double_backward(k, d, s):
    """Second-order MAML differentiates through the rewritten backward."""
    c, p = 2, d * (k - 1) // 2
    x = torch.randn(1, c, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, 1, k, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: kernels.DepthwiseConv.apply(x, w, s, p, d), (x, w))


@pytest.mark.parametrize("name", [op for op in KNOWN_OPS if op != "none"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("norm", NORMS)
def test_each_op_fast_equals_eager_float32(name, stride, norm):
    op = make_op(name, 8, stride, norm)
    x0 = torch.randn(16, 8, 16, 16)
    scale0 = torch.tensor(0.7)
    results = []
    for fast in (False, True):
        with S.fast_path(fast):
            x = S.to_fast_layout(x0.clone()).requires_grad_(True)
            scale = scale0.clone().requires_grad_(True)
            out = scale * op(x) if isinstance(op, torch.nn.Identity) or not fast else op(x, scale=scale)
            loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out.contiguous())).sum()
            params = [p for p in op.parameters()]
            grads = torch.autograd.grad(loss, [x, scale] + params)
            results.append((out.detach().contiguous(), [g.contiguous() for g in grads]))
    (o0, g0), (o1, g1) = results
    torch.testing.assert_close(o1, o0, rtol=1e-4, atol=1e-4)
    for a, b in zip(g1, g0, strict=False):  # float32 sums in another order: relative to the tensor's scale
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize("size", [8, 7])
def test_pixel_phases_factorized_reduce_equals_eager_and_double_backward(size):
    """The fast FactorizedReduce reads two pixel phases instead of striding; odd sizes zero-pad."""
    op = make_op("skip_connect", 4, 2, "batch").double()
    x0 = torch.randn(3, 4, size, size, dtype=torch.float64)
    out = {}
    for fast in (False, True):
        with S.fast_path(fast):
            x = S.to_fast_layout(x0.clone()).requires_grad_(True)
            y = op(x)
            out[fast] = (y, torch.autograd.grad((y * y.detach().sin()).sum(), [x, *op.parameters()]))
    torch.testing.assert_close(out[True][0], out[False][0])
    for a, b in zip(out[True][1], out[False][1], strict=False):
        torch.testing.assert_close(a, b)
    x = torch.randn(2, 2, size, size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: kernels.PixelPhases.apply(x), (x,))


ODD_BATCHES_ON_TWO_THREADS = """
import torch
from fedmetanas_core.space import RelaxSettings, SearchModel, SpaceConfig
torch.set_num_threads(2)
torch.manual_seed(0)
space = SpaceConfig(num_classes=5, init_channels=4, num_cells=3, num_nodes=1, primitives=("none", "skip_connect"))
model = SearchModel(space)  # FactorizedReduce on the reduce cells' edges and after the first reduce cell
for n in (3, 5, 7) * 4:
    x, y = torch.randn(n, 3, 16, 16), torch.randint(0, 5, (n,))
    torch.nn.functional.cross_entropy(model(x, RelaxSettings(threshold=0.0)), y).backward()
"""


def test_fast_path_backward_survives_odd_batches_on_two_threads():
    """oneDNN's stride-2 1x1 backward-weights kernel corrupted the heap on exactly this (FactorizedReduce
    on channels_last, < 16 channels, odd batch, 2 threads); a crash kills the interpreter: a subprocess."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # two spinning threads on a busy box: 10x slower
    done = subprocess.run(
        [sys.executable, "-c", ODD_BATCHES_ON_TWO_THREADS],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"


# =============================================================================================
# The whole supernet: same function, same gradients, same generator draws


@pytest.mark.parametrize(
    "mode,masked", [("gumbel-soft", False), ("gumbel-soft", True), ("gumbel-hard", False), ("softmax", True)]
)
def test_fast_path_task_gradient_equals_eager_float64(mode, masked):
    space = tiny_space()
    model = SearchModel(space).double()
    randomize_arch(model, 1.0, seed=3)
    masks = masks_for(space, model, seed=4) if masked else None
    fw = dict(settings=RelaxSettings(tau=0.5, mode=mode, threshold=0.05), masks=masks)
    g_eager, l_eager = task_gradient(model, fast=False, dtype=torch.float64, **fw)
    g_fast, l_fast = task_gradient(model, fast=True, dtype=torch.float64, **fw)
    assert l_fast == pytest.approx(l_eager, rel=1e-10)
    assert_dicts_close(g_fast, g_eager, rtol=1e-6, atol=1e-8)  # relax() works in float32


def test_fast_path_task_gradient_equals_eager_float32_all_ops_running():
    space = tiny_space(num_nodes=3, input_pruning=True, primitives=KNOWN_OPS)
    model = SearchModel(space)
    fw = dict(settings=RelaxSettings(tau=1.0, mode="gumbel-soft", threshold=0.0))
    g_eager, l_eager = task_gradient(model, fast=False, **fw)
    g_fast, l_fast = task_gradient(model, fast=True, **fw)
    assert l_fast == pytest.approx(l_eager, rel=1e-5)
    scale = max(float(v.abs().max()) for v in g_eager.values())
    assert_dicts_close(g_fast, g_eager, rtol=1e-3, atol=1e-4 * scale)


def test_fast_path_second_order_maml_equals_eager():
    space = tiny_space(primitives=("none", "avg_pool_3x3", "skip_connect", "sep_conv_5x5", "dil_conv_3x3"))
    model = SearchModel(space).double()
    fw = dict(settings=RelaxSettings(tau=1.0, threshold=0.0))
    g_eager, _ = task_gradient(model, fast=False, order=2, dtype=torch.float64, **fw)
    g_fast, _ = task_gradient(model, fast=True, order=2, dtype=torch.float64, **fw)
    assert_dicts_close(g_fast, g_eager, rtol=1e-6, atol=1e-8)  # relax() works in float32


def test_fast_and_eager_run_the_same_ops_and_draw_the_same_noise():
    space = tiny_space()
    model = SearchModel(space)
    randomize_arch(model, 1.5, seed=7)
    settings = RelaxSettings(tau=0.5, threshold=0.05)
    ran = {}
    for fast in (False, True):
        calls = []
        handles = [
            op.register_forward_hook(lambda m, i, o, key=(ci, key, name), calls=calls: calls.append(key))
            for ci, cell in enumerate(model.net.cells)
            for key, edge in cell.edges.items()
            for name, op in edge.ops.items()
        ]
        gen = torch.Generator().manual_seed(5)
        with S.fast_path(fast), torch.no_grad():
            model(batch()[0], settings, None, gen)
        for h in handles:
            h.remove()
        ran[fast] = (sorted(calls), gen.get_state())
    assert ran[True][0] == ran[False][0] and ran[True][0]
    assert torch.equal(ran[True][1], ran[False][1])


def test_discrete_network_fast_equals_eager():
    space = tiny_space()
    model = SearchModel(space)
    randomize_arch(model, 2.0, seed=1)
    net = DiscreteNetwork.inherit(
        model, derive_genotype(space, {k: v for k, v in model.state_dict().items() if is_arch(k)})
    )
    x, y = batch()
    out = {}
    for fast in (False, True):
        n = copy.deepcopy(net)
        with S.fast_path(fast):
            loss = F.cross_entropy(n(x), y)
            loss.backward()
        out[fast] = (loss.detach(), {k: p.grad for k, p in n.named_parameters()})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    scale = max(float(v.abs().max()) for v in out[False][1].values())
    assert_dicts_close(out[True][1], out[False][1], rtol=1e-3, atol=1e-4 * scale)


def test_switch_and_context_manager():
    assert S.fast_path_enabled()  # the default
    with S.fast_path(False):
        assert not S.fast_path_enabled()
        x = torch.randn(2, 3, 4, 4)
        assert S.to_fast_layout(x) is x
    assert S.fast_path_enabled()
    assert S.to_fast_layout(torch.randn(2, 3, 4, 4)).is_contiguous(memory_format=torch.channels_last)


def test_fast_backward_hands_every_op_a_dense_channels_last_gradient():
    """The perf property behind _CatChannels: no op's backward sees a sliced or NCHW gradient."""
    space = tiny_space(num_nodes=3)
    model = SearchModel(space)
    seen = []

    def hook(mod, inp, out):
        if isinstance(out, torch.Tensor) and out.requires_grad and out.dim() == 4:
            out.register_hook(
                lambda g, name=type(mod).__name__: seen.append(  # noqa: B008 (binds this module's name now, on purpose)
                    (name, g.is_contiguous(memory_format=torch.channels_last))
                )
            )

    handles = [m.register_forward_hook(hook) for m in model.net.cells.modules() if not isinstance(m, S.SearchCell)]
    x, y = batch()
    F.cross_entropy(model(x, RelaxSettings(threshold=0.0)), y).backward()
    for h in handles:
        h.remove()
    assert seen and all(dense for _, dense in seen), [name for name, dense in seen if not dense]


@pytest.mark.parametrize("network", ["supernet", "derived", "cnn"])
def test_one_channel_input_runs_every_op_channels_last(network):
    """On one-channel images (digits, the default run) a channels_last input is also contiguous and
    the stem's convolution returns NCHW: unless the stem lays its output out again, every op runs on
    the slow layout (max pooling ~5x slower), silently. Same outputs either way."""
    space = tiny_space(in_channels=1)
    model = SearchModel(space)
    randomize_arch(model, 2.0, seed=1)
    arch = {k: v for k, v in model.state_dict().items() if is_arch(k)}
    net = model if network == "supernet" else DiscreteNetwork.inherit(model, derive_genotype(space, arch))
    net = SimpleCNN(space) if network == "cnn" else net
    cells = {"supernet": lambda: net.net.cells, "derived": lambda: net.cells, "cnn": lambda: net.features[1:]}[
        network
    ]()
    seen = []

    def pre_hook(mod, args):
        x = args[0]
        if isinstance(x, torch.Tensor) and x.dim() == 4 and not isinstance(mod, (S.SearchCell,)):
            seen.append((type(mod).__name__, x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1))

    handles = [m.register_forward_pre_hook(pre_hook) for m in cells.modules() if m is not cells]
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    settings = (RelaxSettings(threshold=0.0, noise=False),) if network == "supernet" else ()
    fast = net(x, *settings)
    for h in handles:
        h.remove()
    assert seen and all(ok for _, ok in seen), sorted({name for name, ok in seen if not ok})
    with S.fast_path(False):
        eager = net(x, *settings)
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)
