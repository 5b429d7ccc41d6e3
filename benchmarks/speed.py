"""Search speed: the plain eager supernet against the fast path, per op, and against the discrete network.

    python -m benchmarks.speed                      # both spaces, writes docs/speed-fast-path.md
    python -m benchmarks.speed --device cuda        # on a GPU (device "auto" picks CUDA when present)
    python -m benchmarks.speed --spaces cifar10-cpu --reps 5 --out /tmp/speed.md
    python -m benchmarks.speed --spaces "" --out ""  # only the flwr run measurements (benchmarks/framework.py)

Spaces: ``paper`` (conf/cifar10.toml: 8 cells, C=16, 4 nodes, 8 ops, batch 64, 32x32x3, 10 classes),
``cifar10-cpu`` (conf/cifar10-cpu.toml: 16x16 images, 3 cells, 2 nodes, C=8, batch 64) and ``digits``
(conf/digits.toml, the default run's space: 8x8x1 images, 2 cells, 2 nodes, C=8, 8 ops, batch 64).

One *local search step* is what ``training.fedmetanas_local_search`` does per task and meta-iteration:
``maml.fomaml_task_gradient`` with ``InnerLoop(1, inner-lr-w, inner-lr-alpha)`` (one task-learner
step on the support batch, then the query gradient: two forward+backward passes) and the meta step
(gradient clip, SGD on weights, Adam on alphas/betas). Eager and fast runs of the same measurement
start from the same weights and the same generator seed (same Gumbel draws, same active ops), and are
interleaved (ABAB...) so that load on a shared machine hits both alike; every ratio comes from this
one run. Times are medians over ``--reps`` repetitions after a warm-up, as wall clock and, on CPU, as
this process's CPU time (steadier when other jobs share the cores).

*Settled* is a late-round state: alphas and betas peaked on one op per edge and one input pair per
node (logit 8 against 0), the server's masks from ``aggregation.update_masks`` at tau-min (which then
prune everything but those), tau = tau-min with Gumbel noise: the supernet runs the same ops as the
derived discrete network, and the table compares the two directly.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from fedmetanas_core import space as S
from fedmetanas_core.method.aggregation import update_masks
from fedmetanas_core.method.genotype import DiscreteNetwork, derive_genotype
from fedmetanas_core.method.maml import InnerLoop, fomaml_task_gradient
from fedmetanas_core.method.training import meta_optimizers, resolve_device, space_from_config, train_settings
from fedmetanas_core.run.config import RunConfig
from fedmetanas_core.space import SearchModel, SpaceConfig, is_arch, make_op
from harness.cli import parse_run_config

ROOT = Path(__file__).resolve().parents[1]
# preset, native image size (image-size 0 = native), input channels: one-channel input takes another
# memory-format path on CPU (space.Stem), so the default run's space is timed too
SPACES = {"paper": ("cifar10.toml", 32, 3), "cifar10-cpu": ("cifar10-cpu.toml", 32, 3), "digits": ("digits.toml", 8, 1)}
OPS = ("max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


# ---------------------------------------------------------------------------------------------
# Timing


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one call."""
        self.sync()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        self.sync()
        return time.perf_counter() - w0, time.process_time() - c0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def interleaved(
    timer: Timer, fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1
) -> dict[str, tuple[float, float]]:
    """Median (wall, cpu) per label; repetitions interleaved, the order rotating each round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    labels = list(fns)
    for r in range(reps):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]
        for label in order:
            samples[label].append(timer(fns[label]))
    return {k: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v)) for k, v in samples.items()}


def with_path(fast: bool, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with S.fast_path(fast):
            return fn()

    return run


# ---------------------------------------------------------------------------------------------
# What is timed


def load_config(name: str) -> tuple[RunConfig, int, int]:
    file, native, channels = SPACES[name]
    cfg = RunConfig.from_flat(parse_run_config([str(ROOT / "conf" / file)]), check_paths=False)  # FedMetaNAS's table
    return cfg, cfg.image_size or native, channels


class Bench:
    """One space: a model, fixed batches, and a snapshot to restart every timed call from."""

    def __init__(self, cfg: RunConfig, image: int, device: torch.device, seed: int = 0, channels: int = 3):
        self.cfg, self.device = cfg, device
        self.space: SpaceConfig = space_from_config(cfg, num_classes=10, in_channels=channels)
        torch.manual_seed(seed)
        self.model = SearchModel(self.space).to(device)
        g = torch.Generator().manual_seed(seed + 1)
        b = cfg.batch_size

        def batch():
            x = torch.randn(b, channels, image, image, generator=g)
            return x.to(device), torch.randint(0, 10, (b,), generator=g).to(device)

        self.support, self.query = batch(), batch()
        self.image = image
        self.masks: dict[str, torch.Tensor] = {}
        self.snapshot()

    def snapshot(self) -> None:
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self) -> None:
        self.model.load_state_dict(self.state)

    def local_step(self, tau: float, mode: str | None = None) -> Callable[[], float]:
        """One local search step as training runs it (one task, InnerLoop(1, ...), meta step)."""
        cfg = self.cfg.replace(relax_mode=mode) if mode else self.cfg
        inner = InnerLoop(1, cfg.inner_lr_w, cfg.inner_lr_alpha)

        def run() -> float:
            self.restore()
            model = self.model
            fw = dict(settings=train_settings(cfg, tau), masks=self.masks, generator=torch.Generator().manual_seed(7))
            opt_w, opt_a = meta_optimizers(model, cfg)
            grads, loss = fomaml_task_gradient(
                model, dict(model.named_parameters()), self.support, self.query, inner, **fw
            )
            for name, p in model.named_parameters():
                p.grad = grads[name]
            torch.nn.utils.clip_grad_norm_(model.net.parameters(), cfg.grad_clip)
            opt_w.step()
            opt_a.step()
            return loss

        return run

    def supernet_pass(self, tau: float) -> Callable[[], None]:
        """One forward+backward of the supernet (the unit a local step is made of)."""

        def run() -> None:
            self.model.zero_grad(set_to_none=True)
            settings = train_settings(self.cfg, tau)
            x, y = self.support
            F.cross_entropy(self.model(x, settings, self.masks, torch.Generator().manual_seed(7)), y).backward()

        return run

    def settle(self, seed: int = 3) -> None:
        """Late-round state: one op per edge and one pair per node dominate; masks prune the rest."""
        g = torch.Generator().manual_seed(seed)
        real = [o for o, p in enumerate(self.space.primitives) if p != "none"]
        with torch.no_grad():
            for p in self.model.arch.alpha.values():
                p.zero_()
                for e in range(p.shape[0]):
                    p[e, real[int(torch.randint(len(real), (1,), generator=g))]] = 8.0
            for p in self.model.arch.beta.values():
                p.zero_()
                p[int(torch.randint(p.numel(), (1,), generator=g))] = 8.0
        arch = {k: v.detach() for k, v in self.model.state_dict().items() if is_arch(k)}
        self.masks = update_masks(self.space, arch, {}, self.cfg.mask_threshold, self.cfg.tau_min)
        self.snapshot()

    def discrete(self) -> DiscreteNetwork:
        arch = {k: v.detach() for k, v in self.model.state_dict().items() if is_arch(k)}
        return DiscreteNetwork.inherit(self.model, derive_genotype(self.space, arch, self.masks)).to(self.device)


def discrete_pass(net: DiscreteNetwork, batch) -> Callable[[], None]:
    def run() -> None:
        net.zero_grad(set_to_none=True)
        x, y = batch
        F.cross_entropy(net(x), y).backward()

    return run


def discrete_local_step(net: DiscreteNetwork, cfg: RunConfig, support, query) -> Callable[[], float]:
    """The same MAML step on the discrete network (weights only): the like-for-like comparison."""
    inner = InnerLoop(1, cfg.inner_lr_w, cfg.inner_lr_alpha)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def run() -> float:
        net.load_state_dict(state)
        opt = torch.optim.SGD(net.parameters(), lr=cfg.outer_lr_w, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        grads, loss = fomaml_task_gradient(net, dict(net.named_parameters()), support, query, inner)
        for name, p in net.named_parameters():
            p.grad = grads[name]
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        return loss

    return run


def op_pass(name: str, c: int, size: int, batch: int, device: torch.device, fast: bool) -> Callable[[], None]:
    """One op on one edge (stride 1) with its mixing weight, forward+backward, as a cell runs it."""
    torch.manual_seed(0)
    op = make_op(name, c, 1, "batch").to(device)  # the default space's BatchNorm
    with S.fast_path(fast):
        x = S.to_fast_layout(torch.randn(batch, c, size, size, device=device)).requires_grad_(True)
    w = torch.tensor(0.3, device=device, requires_grad=True)
    grad = (
        S.to_fast_layout(torch.randn(batch, c, size, size, device=device))
        if fast
        else torch.randn(batch, c, size, size, device=device)
    )

    def run() -> None:
        with S.fast_path(fast):
            out = op(x, scale=w) if fast and not isinstance(op, torch.nn.Identity) else w * op(x)
            out.backward(grad)

    return run


# ---------------------------------------------------------------------------------------------
# The report


def ms(seconds: float) -> str:
    return f"{1000 * seconds:,.0f}" if seconds >= 0.1 else f"{1000 * seconds:.1f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"


def fmt(t: tuple[float, float]) -> str:
    return f"{t[0]:.2f}, {t[1]:.2f}"


def run_space(name: str, device: torch.device, reps: int, log) -> list[str]:
    cfg, image, channels = load_config(name)
    bench = Bench(cfg, image, device, channels=channels)
    timer = Timer(device)
    sp = bench.space
    on_cpu = device.type == "cpu"
    head = (
        f"### `{name}`: {sp.num_cells} cells, C={sp.init_channels}, {sp.num_nodes} nodes, {len(sp.primitives)} ops, "
        f"batch {cfg.batch_size}, {image}x{image}x{channels}, 10 classes ({reps} reps)"
    )
    log(f"[{name}] timing ...")
    # 1. early search: every op runs (tau-max, Gumbel noise, no masks). No separate warm-up: the
    # first (cold) repetition of each is absorbed by the median.
    tau0 = cfg.tau_max
    r = interleaved(
        timer,
        {
            "eager": with_path(False, bench.local_step(tau0)),
            "fast": with_path(True, bench.local_step(tau0)),
            "hard": with_path(True, bench.local_step(tau0, "gumbel-hard")),
        },
        reps,
        warmup=0,
    )
    log(
        f"  local step (wall s, cpu s): eager {fmt(r['eager'])}; fast {fmt(r['fast'])}; gumbel-hard fast "
        f"{fmt(r['hard'])}"
    )
    e, f, h = r["eager"], r["fast"], r["hard"]

    # 2. settled: late-round state against the derived discrete network (fast path)
    bench.settle()
    net = bench.discrete()
    tau1 = cfg.tau_min
    s = interleaved(
        timer,
        {
            "step": with_path(True, bench.local_step(tau1)),
            "disc-step": with_path(True, discrete_local_step(net, cfg, bench.support, bench.query)),
            "pass": with_path(True, bench.supernet_pass(tau1)),
            "disc-pass": with_path(True, discrete_pass(net, bench.support)),
        },
        reps,
        warmup=0,
    )
    log("  settled (wall s, cpu s): " + "; ".join(f"{k} {fmt(v)}" for k, v in s.items()))

    cpu = on_cpu  # process CPU time is meaningful on CPU only
    lines = [head, ""]
    lines += [
        "| local search step (2 forward+backward + meta step) | wall ms | fast / eager (wall) |"
        + (" CPU ms | fast / eager (CPU) |" if cpu else ""),
        "|---|---:|---:|" + ("---:|---:|" if cpu else ""),
        f"| eager reference path, gumbel-soft, tau={tau0:g} (every op runs) | {ms(e[0])} | 1 |"
        + (f" {ms(e[1])} | 1 |" if cpu else ""),
        f"| **fast path**, gumbel-soft, tau={tau0:g} (target <= 0.4) | {ms(f[0])} | **{ratio(f[0], e[0])}** |"
        + (f" {ms(f[1])} | **{ratio(f[1], e[1])}** |" if cpu else ""),
        f"| fast path, *gumbel-hard* (straight-through: a different relaxation; runs only the sampled op and pair) "
        f"| {ms(h[0])} | {ratio(h[0], e[0])} |" + (f" {ms(h[1])} | {ratio(h[1], e[1])} |" if cpu else ""),
        "",
        f"Settled (late rounds: one op per edge and one pair per node dominate, masks prune the rest, tau={tau1:g} "
        f"with Gumbel noise), fast path:",
        "",
        "| | settled supernet ms | derived discrete network ms | supernet / discrete (wall) |"
        + (" supernet CPU ms | discrete CPU ms | supernet / discrete (CPU) |" if cpu else ""),
        "|---|---:|---:|---:|" + ("---:|---:|---:|" if cpu else ""),
    ]
    for label, a, b in (
        ("local search step (MAML, InnerLoop(1), meta step)", s["step"], s["disc-step"]),
        ("one forward+backward", s["pass"], s["disc-pass"]),
    ):
        lines.append(
            f"| {label} | {ms(a[0])} | {ms(b[0])} | **{ratio(a[0], b[0])}** |"
            + (f" {ms(a[1])} | {ms(b[1])} | **{ratio(a[1], b[1])}** |" if cpu else "")
        )
    lines.append("")

    # 3. per op: one edge at the first cell's channels and resolution, stride 1
    per_op = interleaved(
        timer,
        {
            f"{op}/{fast}": op_pass(op, sp.init_channels, image, cfg.batch_size, device, fast)
            for op in OPS
            for fast in (False, True)
        },
        5,
        warmup=2,
    )
    lines += [
        f"Per op, one edge ({cfg.batch_size}x{sp.init_channels}x{image}x{image}, stride 1, times its mixing "
        f"weight), forward+backward:",
        "",
        "| op | eager ms | fast ms | fast / eager |"
        + (" eager CPU ms | fast CPU ms | fast / eager (CPU) |" if on_cpu else ""),
        "|---|---:|---:|---:|" + ("---:|---:|---:|" if on_cpu else ""),
    ]
    for op in OPS:
        e, f = per_op[f"{op}/False"], per_op[f"{op}/True"]
        lines.append(
            f"| {op} | {ms(e[0])} | {ms(f[0])} | {ratio(f[0], e[0])} |"
            + (f" {ms(e[1])} | {ms(f[1])} | {ratio(f[1], e[1])} |" if on_cpu else "")
        )
    lines.append("")
    log("\n".join(lines))
    return lines


def machine(device: torch.device) -> list[str]:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = [
        f"- machine: {os.cpu_count()} CPU cores, {model}, {platform.system()} {platform.machine()}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), oneDNN "
        f"{'on' if torch.backends.mkldnn.is_available() else 'off'}",
        f"- device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
    ]
    try:
        out.append(
            f"- load average at start: {', '.join(f'{v:.1f}' for v in os.getloadavg())} (other jobs on the machine "
            f"slow both paths alike; CPU-time columns are steadier)"
        )
    except OSError:
        pass
    return out


EXPLANATION = """\
## What the fast path does (fedmetanas_core/space/)

The fast path is the default; `space.set_fast_path(False)` (or `with fast_path(False):`) gives the
plain eager reference path (the straightforward DARTS code, NCHW, one module call per op). Both compute
the same function with the same parameters, generator draws and active ops; `tests/test_speed_paths.py`
checks outputs and first- and second-order MAML gradients against each other (float64: to 1e-6
relative, the relaxation itself runs in float32; float32: within float rounding).

- **channels_last on CPU.** oneDNN's depthwise, 1x1 and pooling kernels are several times faster on
  NHWC activations. The input is converted once and every op keeps the format; parameters and the
  state-dict layout are unchanged. (CUDA keeps NCHW unless `space.CHANNELS_LAST_DEVICES` gets "cuda".)
- **Dense gradients out of every channel concatenation.** Autograd hands each input of `torch.cat` a
  channel slice of the output gradient (neither NCHW- nor NHWC-dense; the classifier's pooling even
  returns NCHW), so BatchNorm and convs all over the backward pass copied or took slow paths. The
  cell output (and FactorizedReduce) concatenate through a function whose backward returns dense
  channels_last gradients: BatchNorm's backward alone fell from ~2.3 s to ~0.6 s per pass (paper space).
- **Depthwise-conv gradients on oneDNN's fast kernels.** oneDNN's backward kernels are fast only for
  3x3 (or narrower) undilated depthwise kernels; the 5x5 and dilated convs of DARTS fall back to generic
  kernels 5-30x slower than their forward. The input gradient is rewritten as a forward conv with the
  flipped kernel (zero-stuffed or transposed for stride 2), the weight gradient as narrow-kernel pieces
  (column blocks <= 3 wide; dilation removed by a polyphase split). Exact in real arithmetic; the
  backward is itself differentiable (second-order MAML).
- **3x3 average pool (stride 1)** as a depthwise all-ones conv times 1/count: the same values, on the
  depthwise kernels.
- **The mixing weight inside the last BatchNorm.** `w * BN(x)` is BN with per-channel weight `w`: the
  separate multiply over the whole activation, and its backward, disappear.
- **One ReLU per cell state**, shared by every conv op (and the reduction's FactorizedReduce) that reads
  it, instead of one per op and edge.
- **No host syncs beyond one per forward.** Masked, `none` and below-threshold ops are skipped from one
  host transfer for both cell types (was one per cell type plus one per node for the guaranteed op);
  the pair incidence matrices are cached per device; the mixing weights are unbound once per forward
  instead of indexed per op.
- **gumbel-hard** (`relax-mode = "gumbel-hard"`) runs only the sampled op on the sampled pair: a
  different relaxation (straight-through gradients), shown as its own row, not as a speed-up of the
  soft one.

Not done: batching same-op edges that share an input (bypasses the per-op modules that tests hook and
the discrete network inherits; the CPU ops here are bandwidth-bound, not launch-bound, so little to
gain), merging the two 1x1 convs of a sep_conv (a BatchNorm and a ReLU sit between them, so they do not
compose), a hand-written BatchNorm from torch ops (more passes over memory than the native kernel once
its gradient input is dense), and torch.compile (minutes of compilation per active-op pattern under
`functional_call`, and the pattern changes with the Gumbel draws and masks).

Timing notes: one intra-op thread (as Flower's simulated clients run); on a machine shared with other
jobs, wall-clock times swing with their load, so the process-CPU-time columns are the steadier basis
for the ratios. Both come from the same interleaved run.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spaces", default="paper,cifar10-cpu", help="comma-separated: paper, cifar10-cpu, digits")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 = as simulated clients run; 0 = torch default)",
    )
    ap.add_argument(
        "--reps", type=int, default=3, help="repetitions of the big space's steps (the small space uses max(reps, 5))"
    )
    ap.add_argument(
        "--out", default=str(ROOT / "docs" / "speed-fast-path.md"), help="Markdown report ('' = print only)"
    )
    ap.add_argument(
        "--flower-clients", default="10,100", help="simulated clients for the flwr run measurements ('' = skip them)"
    )
    ap.add_argument("--flower-rounds", type=int, default=3, help="rounds of each flwr run measurement")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    started = time.perf_counter()

    def log(text: str) -> None:
        print(text, flush=True)

    command = "python -m benchmarks.speed" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    lines = [
        "# Search speed: eager reference path vs fast path",
        "",
        f"Generated by `{command}` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.",
        "",
        *machine(device),
        "",
    ]
    log("\n".join(lines))
    for name in [s.strip() for s in args.spaces.split(",") if s.strip()]:
        if name not in SPACES:
            raise SystemExit(f"unknown space {name!r}; choose from {', '.join(SPACES)}")
        reps = args.reps if name == "paper" else max(args.reps, 5)
        lines += run_space(name, device, reps, log)
    if args.flower_clients.strip():
        from benchmarks import framework

        lines += framework.run([int(c) for c in args.flower_clients.split(",")], args.flower_rounds, [], log)
        lines += [framework.__doc__.split("\n\n", 2)[2].strip(), ""]
    lines.append(f"Total benchmark time: {time.perf_counter() - started:.0f} s.")
    lines += ["", EXPLANATION]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
