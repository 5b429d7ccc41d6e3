"""Does freezing BatchNorm's statistics help a cell network under FedAvg on non-IID clients?

A probe for the cifar10-cpu front's gap to the CNN (docs/results-frontier.md): a cell network's many
batch-statistics normalisations train on skewed client batches and are scored on balanced ones.
FixBN (Zhong et al., "Making Batch Normalization Great in Federated Deep Learning", 2023) trains
with batch statistics for a first stretch of rounds, then fixes every normalisation to the
federation's statistics and trains on with those. Unlike switching to per-image normalisation
(``norm = "group" search-norm = "batch"``, which fell to chance at the switch), the network's
function barely changes at the switch: the federation's statistics are close to those of a
balanced batch.

The federation's statistics of a layer's input are sums over the clients (count, sum, sum of
squares per channel), so pooling every client's training data here computes exactly what a
secure-summed federated round would. FedAvg itself is the core's: ``train_fixed`` per client,
the average weighted by the clients' training examples, scored on the validation carve. On fixed
statistics the preset's rate diverges, so ``--lr-scale`` lowers it after the switch, and
``--no-fix`` is the control that lowers it and keeps batch statistics. A probe, not a feature:
it routes the fast path's normalisation (``ops.scaled_norm``) through the fixed statistics while it runs.
Results and reading: docs/results-frontier.md ("Fixing BatchNorm's statistics").

    python -m benchmarks.fixbn_probe -c conf/cifar10-cpu.toml -c 'method="fedavg" budget="macs:1600000" \
        init-channels=0 eval-split="validation" num-server-rounds=16 seed=0 torch-threads=1 num-partitions=10 \
        fedavg-genotype="..."' --fix-round 8 --lr-scale 0.3 [--no-fix] --out DIR/VARIANT.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fedmetanas_core.space.kernels as kernels
import fedmetanas_core.space.ops as ops
from fedmetanas_core.data import DataSpec, load_client_data
from fedmetanas_core.data.run_data import validation_set
from fedmetanas_core.federation.coordinator import image_hw, seeded_init, space_for_run
from fedmetanas_core.method.budget import fixed_network_width
from fedmetanas_core.method.genotype import Genotype, build_fixed_network
from fedmetanas_core.method.training import RoundPlan, evaluate, run_settings, train_fixed
from fedmetanas_core.util.seeding import make_generator
from harness.cli import resolve_run_config


class FixedStatsNorm(nn.Module):
    """A normalisation by fixed per-channel statistics (no affine parameters, as the space's)."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("mean", mean, persistent=False)  # not a weight: FedAvg never sees it
        self.register_buffer("var", var, persistent=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mean, self.var, None, None, False, 0.0, self.eps)


_batch_scaled_norm = kernels.scaled_norm


def _scaled(norm: nn.Module, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The reference path's normalisation and mixing: the module, times ``scale`` when given."""
    out = norm(x)
    return out if scale is None else scale * out


def _scaled_norm(norm: nn.Module, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The fast path's normalisation, with fixed statistics where a layer has them (the module
    itself, as the reference path calls it)."""
    return _scaled(norm, x, scale) if isinstance(norm, FixedStatsNorm) else _batch_scaled_norm(norm, x, scale)


@contextlib.contextmanager
def fixed_statistics_path():
    """The fast path's normalisation takes fixed statistics where a layer has them, in this block only."""
    previous, ops.scaled_norm = ops.scaled_norm, _scaled_norm
    try:
        yield
    finally:
        ops.scaled_norm = previous


@torch.no_grad()
def federation_statistics(net: nn.Module, clients, batch_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each batch-statistics BatchNorm's input mean and variance over every client's training data,
    the network run as it trains (batch statistics upstream)."""
    sums: dict[str, list] = {}

    def hook(name):
        def record(_module, inputs):
            x = inputs[0].double()
            s = sums.setdefault(name, [0, 0.0, 0.0])
            s[0] += x.numel() // x.shape[1]
            s[1] = s[1] + x.sum(dim=(0, 2, 3))
            s[2] = s[2] + (x * x).sum(dim=(0, 2, 3))

        return record

    norms = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in norms]
    previous, ops.scaled_norm = ops.scaled_norm, _scaled  # through the modules, so the hooks see them
    try:
        net.train()
        for data in clients:
            pool = data.pool
            for start in range(0, len(pool), batch_size):
                if len(pool) - start >= 2:
                    net(pool.x[start : start + batch_size])
    finally:
        ops.scaled_norm = previous
        for h in handles:
            h.remove()
    out = {}
    for name, (n, s, ss) in sums.items():
        mean = s / n
        out[name] = (mean.float(), (ss / n - mean * mean).clamp_min(0).float())
    return out


def fix_statistics(net: nn.Module, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for name, (mean, var) in stats.items():
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        old = parent._modules[child]
        parent._modules[child] = FixedStatsNorm(mean, var, old.eps)


def run(items: list[str], fix_round: int, out: Path, lr_scale: float = 1.0, fix: bool = True) -> dict:
    _, cfg = resolve_run_config(items)
    with run_settings(cfg, threads=cfg.torch_threads or 1), fixed_statistics_path():
        val = validation_set(cfg)
        space = space_for_run(cfg, val)
        genotype = Genotype.load_yaml(cfg.fedavg_genotype) if cfg.fedavg_genotype else None
        channels = fixed_network_width(cfg, space, image_hw(val), genotype)
        net = seeded_init(lambda: build_fixed_network(space, genotype, channels), cfg.seed, "fedavg")
        clients = [load_client_data(DataSpec.from_config(cfg, {"partition-id": p})) for p in range(cfg.num_partitions)]
        weights = torch.tensor([len(c.pool) for c in clients], dtype=torch.float64)
        weights = weights / weights.sum()
        rows, t0, at_switch = [], time.time(), None
        for rnd in range(1, cfg.num_server_rounds + 1):
            late = bool(fix_round and rnd > fix_round)
            if fix and fix_round and rnd == fix_round + 1:
                fix_statistics(net, federation_statistics(net, clients, cfg.batch_size))
                at_switch = evaluate(net, val, cfg.eval_batch_size, torch.device("cpu"))
                print(json.dumps({"at-switch": at_switch}), flush=True)
            start = {k: v.clone() for k, v in net.state_dict().items()}
            total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in start.items()}
            lr = cfg.outer_lr_w * (lr_scale if late else 1.0)
            plan = RoundPlan(rnd, 1.0, False, {}, lr, cfg.local_epochs)
            for w, data in zip(weights, clients, strict=True):
                net.load_state_dict(start)
                gen = make_generator(cfg.seed, "train", data.partition_id, "fixed", rnd)
                train_fixed(net, data, cfg, plan, gen, torch.device("cpu"))
                for k, v in net.state_dict().items():
                    total[k] += w * v.double()
            net.load_state_dict({k: v.to(start[k].dtype) for k, v in total.items()})
            result = evaluate(net, val, cfg.eval_batch_size, torch.device("cpu"))
            rows.append({"round": rnd, **result, "fixed": fix and late, "s": time.time() - t0})
            print(json.dumps(rows[-1]), flush=True)
    summary = {
        **{"fix_round": fix_round, "fix": fix, "lr_scale": lr_scale, "seed": cfg.seed},
        **{"at_switch": at_switch, "final": rows[-1]["accuracy"], "rounds": rows},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--run-config", action="append", default=[])
    parser.add_argument("--fix-round", type=int, default=0, help="fix the statistics after this round (0: never)")
    parser.add_argument("--lr-scale", type=float, default=1.0, help="the weights' rate times this after --fix-round")
    parser.add_argument("--no-fix", action="store_true", help="keep batch statistics (the control for --lr-scale)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    run(args.run_config, args.fix_round, args.out, args.lr_scale, not args.no_fix)


if __name__ == "__main__":
    main()
