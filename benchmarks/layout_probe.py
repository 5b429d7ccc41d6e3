"""Which cells should reduce at a small budget? A centralised probe on validation data.

    python -m benchmarks.layout_probe --preset digits --budgets macs:20000,macs:50000,macs:130000 \
        --layouts darts,0,1 --out benchmarks/results/layout-probe/digits

For each budget and reduction layout (``darts``: DARTS's rule; else ``reduction-cells`` as
``0,1``-style indices joined by ``+`` on the command line, e.g. ``0+1``), the space is sized to the
budget exactly as a run sizes it (``init-channels = 0``), random cells are drawn within the budget
(the NAS baseline, one per seed), and each is trained centrally (all the training data in one place,
SGD with momentum, a fixed number of epochs) and scored on a validation split carved from the
training data: never the test set. The small CNN at the same budget is the reference. Training
centrally isolates the space's capacity at a cost from the federated dynamics; the choice it
suggests is then checked in federated runs (docs/cost-aware.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedmetanas_core.data.sources import load_dataset
from fedmetanas_core.method.budget import cnn_width_within, cost_model, random_genotype_within, run_space
from fedmetanas_core.method.genotype import DiscreteNetwork, SimpleCNN, count_parameters
from fedmetanas_core.run.outputs import machine_description
from fedmetanas_core.space.cost import count_macs
from fedmetanas_core.util.atomic import atomic_write_text
from harness.cli import resolve_run_config

ROOT = Path(__file__).resolve().parents[1]


def train_and_score(net, x, y, train_idx, val_idx, seed: int, epochs: int, lr: float) -> float:
    torch.manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx))]
        for i in range(0, len(order), 64):
            batch = order[i : i + 64]
            if len(batch) < 2:  # batch-statistics BatchNorm needs two examples
                continue
            loss = F.cross_entropy(net(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        correct = sum(
            int((net(x[val_idx[i : i + 512]]).argmax(1) == y[val_idx[i : i + 512]]).sum())
            for i in range(0, len(val_idx), 512)
        )
    return correct / len(val_idx)


def probe(items: list[str], budget: str, layout: str, seeds: list[int], epochs: int, lr: float, data) -> list[dict]:
    layout_key = "" if layout == "darts" else layout.replace("+", ",")
    _, cfg = resolve_run_config([*items, f'budget="{budget}"', "init-channels=0", f'reduction-cells="{layout_key}"'])
    space, image_hw = run_space(cfg)
    model = cost_model(cfg, space, image_hw)
    limit = float(budget.split(":")[1])
    x, y, train_idx, val_idx = data
    example = torch.zeros(1, space.in_channels, *image_hw)
    rows = []
    nets = {"random cell": []}
    for seed in seeds:
        genotype = random_genotype_within(space, model, limit, seed)
        if genotype is not None:
            nets["random cell"].append((seed, lambda g=genotype: DiscreteNetwork(space, g)))
    if layout == "darts":  # the CNN ignores the layout: measured once, with the DARTS row
        width = cnn_width_within(space, "macs", limit, image_hw)
        nets[f"cnn (width {width})"] = [(seed, lambda: SimpleCNN(space, width)) for seed in seeds]
    for name, makers in nets.items():
        if not makers:
            continue
        accs, macs, params = [], [], []
        for seed, make in makers:
            torch.manual_seed(1000 + seed)
            net = make()
            macs.append(count_macs(net, example))
            params.append(count_parameters(net))
            accs.append(train_and_score(net, x, y, train_idx, val_idx, seed, epochs, lr))
        row = {
            "budget": budget,
            "layout": layout,
            "cell_types": space.cell_types(),
            "init_channels": space.init_channels,
            "network": name,
            "seeds": len(accs),
            "macs_mean": float(np.mean(macs)),
            "params_mean": float(np.mean(params)),
            "validation_accuracy_mean": float(np.mean(accs)),
            "validation_accuracy_std": float(np.std(accs)),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| budget | layout | cells | width | network | MACs | params | validation accuracy |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['layout']} | {','.join(r['cell_types'])} | {r['init_channels']} | {r['network']} "
            f"| {r['macs_mean']:,.0f} | {r['params_mean']:,.0f} "
            f"| {r['validation_accuracy_mean']:.3f} ± {r['validation_accuracy_std']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--budgets", required=True)
    ap.add_argument("--layouts", default="darts,0+1", help="darts, or cell indices joined by + (e.g. 0+1)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--validation", type=int, default=300, help="training images held out for scoring")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    items = [str(ROOT / "conf" / f"{args.preset}.toml")]
    _, cfg = resolve_run_config(items)
    train, _ = load_dataset(
        cfg.dataset,
        cfg.resolved_data_dir() if cfg.dataset != "digits" else "",
        image_size=cfg.image_size,
        train_subset=cfg.train_subset,
        on_corrupt_image=cfg.on_corrupt_image,
    )
    perm = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(0))
    data = (train.x, train.y, perm[args.validation :], perm[: args.validation])
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for budget in args.budgets.split(","):
        for layout in args.layouts.split(","):
            rows += probe(items, budget, layout, seeds, args.epochs, args.lr, data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Layout probe: {args.preset}, centralised, {args.epochs} epochs, validation = {args.validation} "
        f"training images, seeds {args.seeds}\n\nMachine: {machine_description()}."
    )
    atomic_write_text(out / "layout-probe.json", json.dumps(rows, indent=1))
    atomic_write_text(out / "layout-probe.md", markdown(rows, header))
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
