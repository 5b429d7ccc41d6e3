"""Local work on one client, for each method, and evaluation. Flower-free: the apps call these.

- FedMetaNAS: first-order MAML (or exact MAML, or Reptile) over weights and alphas, with the
  round's temperature and masks from the server.
- FedNAS: MiLeNAS-style first-order search (alpha gradient = validation + training loss), plain softmax.
- FedAvg / FedNAS retraining: SGD on a fixed discrete network.

All three are ``LocalTrainer``s, one signature, and ``LOCAL_TRAINING`` says which one a phase
kind of a method runs: the ClientApp only looks it up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..data import BatchStream, ClientData, DataError, ImageData
from ..names import is_arch
from ..run.config import RunConfig
from ..space import RelaxSettings, SearchModel, SpaceConfig, fast_path
from ..space.cost import CostModel
from .aggregation import masks_are_discrete
from .genotype import DiscreteNetwork, derive_genotype
from .maml import (
    InnerLoop,
    Penalty,
    fomaml_task_gradient,
    inner_adapt,
    mean_dicts,
    reptile_task_delta,
    second_order_task_gradient,
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def run_settings(cfg: RunConfig, threads: int = 0) -> Iterator[None]:
    """A run's process-wide torch settings (determinism, fast path, ``threads`` when > 0) for one
    call, then the process's own again: one process (a Ray actor, a test session, a ServerApp
    process) may serve several runs, and a run must not inherit the previous run's settings."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    num_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(cfg.deterministic)
    if threads:
        torch.set_num_threads(threads)
    try:
        with fast_path(cfg.fast_path):
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        if threads:
            torch.set_num_threads(num_threads)


def space_from_config(
    cfg: RunConfig, num_classes: int, in_channels: int, init_channels: int | None = None
) -> SpaceConfig:
    """The run's space; ``init_channels`` overrides the key (the width the server sized to a budget)."""
    return SpaceConfig(
        num_classes=num_classes,
        in_channels=in_channels,
        init_channels=cfg.init_channels if init_channels is None else init_channels,
        num_cells=cfg.num_cells,
        num_nodes=cfg.num_nodes,
        stem_multiplier=cfg.stem_multiplier,
        primitives=cfg.primitive_list,
        reduction_positions=cfg.reduction_positions,
        norm=cfg.norm,
        search_norm=cfg.search_norm,
        input_pruning=cfg.input_pruning if cfg.method == "fedmetanas" else False,
    )


@dataclass
class RoundPlan:
    """What the server decides for a round and sends along: schedule position, masks, and what
    differs between phases (step size, local epochs), so every local trainer takes the same inputs."""

    server_round: int
    tau: float
    alpha_frozen: bool = False
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    lr_w: float | None = None  # the round's weight learning rate (None: outer-lr-w)
    local_epochs: int | None = None  # epoch-based trainers' local epochs (None: local-epochs)
    cost: CostModel | None = None  # the run's cost model when it has a budget (search phases)
    budget: str | None = None  # the budget that cost model is for (KIND:LIMIT): a tier's in a tiered run


@dataclass
class LocalResult:
    num_examples: int
    train_loss: float
    steps: int  # optimizer (meta) steps on the weights
    images: int = 0  # examples passed forward and backward in training: the round's compute


# ---------------------------------------------------------------------------------------------
# state <-> numpy (what travels)


def state_arrays(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def load_arrays(module: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    own = module.state_dict()
    missing = set(own) - set(arrays)
    unexpected = set(arrays) - set(own)
    if missing or unexpected:
        raise KeyError(f"state mismatch: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    module.load_state_dict({k: torch.as_tensor(np.asarray(v)).to(own[k].dtype) for k, v in arrays.items()})


def _to(batch, device):
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _clip(params, max_norm: float) -> None:
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def _anchor(module: nn.Module, mu: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FedProx: remember the round's global weights to pull the local ones back towards them."""
    if mu <= 0:
        return []
    return [(p, p.detach().clone()) for p in module.parameters()]


def _add_proximal(anchors: list[tuple[torch.Tensor, torch.Tensor]], mu: float) -> None:
    """Gradient of mu/2 * ||w - w_global||^2, added to the weights' gradients before the step."""
    for p, p0 in anchors:
        if p.grad is not None:
            p.grad.add_(p.detach() - p0, alpha=mu)


# ---------------------------------------------------------------------------------------------
# FedMetaNAS: MAML over weights and alphas


def train_settings(cfg: RunConfig, tau: float) -> RelaxSettings:
    return RelaxSettings(tau=tau, mode=cfg.relax_mode, noise=True, threshold=cfg.prune_threshold)


def eval_settings(cfg: RunConfig, tau: float) -> RelaxSettings:
    return RelaxSettings(
        tau=tau, mode="softmax", noise=False, threshold=cfg.prune_threshold, argmax=cfg.eval_mode == "argmax"
    )


def weight_optimizer(net: nn.Module, cfg: RunConfig, lr_w: float | None = None) -> torch.optim.SGD:
    return torch.optim.SGD(
        net.parameters(),
        lr=cfg.outer_lr_w if lr_w is None else lr_w,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )


def arch_optimizer(model: SearchModel, cfg: RunConfig) -> torch.optim.Adam:
    return torch.optim.Adam(
        model.arch.parameters(), lr=cfg.outer_lr_alpha, betas=(0.5, 0.999), weight_decay=cfg.alpha_weight_decay
    )


def meta_optimizers(model: SearchModel, cfg: RunConfig, lr_w: float | None = None):
    """Re-created every round: clients are stateless, and no stale Adam moments survive a mask."""
    return weight_optimizer(model.net, cfg, lr_w), arch_optimizer(model, cfg)


def fedmetanas_local_search(
    model: SearchModel,
    data: ClientData,
    cfg: RunConfig,
    plan: RoundPlan,
    generator: torch.Generator,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> LocalResult:
    """Meta-train (w, alpha, beta) on tasks from the client's train (support) and query splits.

    Once the server's masks leave one op per edge and one input pair per node, the supernet computes
    exactly the derived network and no alpha or beta gets a gradient: the same meta-training then
    runs on that network (no op mixing, no architecture graph) and its weights go back into the
    supernet, so the reply is the same state at the discrete network's cost.
    """
    model.train()
    net = decided_network(model, plan.masks, device)
    if net is not None:
        net.train()
        result = meta_train(net, net, None, data, cfg, plan, generator, device, proximal_mu, {})
        loaded = model.net.load_state_dict(net.state_dict(), strict=False)  # missing: the pruned ops, expected
        if loaded.unexpected_keys:  # a renamed key would otherwise drop this round's training silently
            raise KeyError(f"derived-network weights not in the supernet: {loaded.unexpected_keys[:3]}")
        return result
    fw = dict(settings=train_settings(cfg, plan.tau), masks=plan.masks, generator=generator)
    opt_a = None if plan.alpha_frozen else arch_optimizer(model, cfg)
    penalty = cost_penalty(cfg, plan) if opt_a is not None else None
    return meta_train(model, model.net, opt_a, data, cfg, plan, generator, device, proximal_mu, fw, penalty)


def decided_network(model: SearchModel, masks: dict[str, torch.Tensor], device: torch.device) -> DiscreteNetwork | None:
    """The derived network with the supernet's weights once ``masks`` leave one op per edge and one
    input pair per node (the supernet then computes exactly it); None while the cell is undecided."""
    arch = {k: v.detach() for k, v in model.state_dict().items() if is_arch(k)}
    if not masks_are_discrete(model.space, arch, masks):
        return None
    return DiscreteNetwork.inherit(model, derive_genotype(model.space, arch, masks)).to(device)


def cost_penalty(cfg: RunConfig, plan: RoundPlan) -> Penalty | None:
    """The budget's cost term of the architecture logits under the round's masks (None: no budget)."""
    from .budget import budget_of

    budget = budget_of(cfg, plan.budget)  # a tier's client: its tier's budget, not the run's
    if budget is None or plan.cost is None:
        return None
    cost, masks = plan.cost, plan.masks

    def penalty(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return budget.penalty(cost.expected_cost({k: v for k, v in params.items() if is_arch(k)}, masks))

    return penalty


def meta_train(
    module: nn.Module,
    weights: nn.Module,
    opt_a: torch.optim.Optimizer | None,
    data: ClientData,
    cfg: RunConfig,
    plan: RoundPlan,
    generator: torch.Generator,
    device: torch.device,
    proximal_mu: float,
    fw: dict,
    penalty: Penalty | None = None,
) -> LocalResult:
    """The meta-learning loop over ``module``'s parameters: ``weights`` holds the network weights,
    ``opt_a`` steps the architecture (None: frozen or absent), ``penalty`` joins every loss."""
    if cfg.query_source == "train":  # one stream over all training data: query = the next, disjoint, minibatch
        support_stream = query_stream = BatchStream(data.pool, cfg.batch_size, generator)
    else:
        support_stream = BatchStream(data.train, cfg.batch_size, generator)
        query_stream = BatchStream(data.query, cfg.batch_size, generator)
    inner = InnerLoop(cfg.inner_steps, cfg.inner_lr_w, cfg.inner_lr_alpha, adapt_arch=opt_a is not None)
    opt_w = weight_optimizer(weights, cfg, plan.lr_w)
    anchors = _anchor(weights, proximal_mu)
    losses, images = [], 0
    named = list(module.named_parameters())  # walked once: the steps update these tensors in place
    weight_params = list(weights.parameters())
    for _ in range(cfg.local_meta_iters):
        params = dict(named)
        task_results = []
        for _ in range(cfg.tasks_per_meta_batch):
            support = _to(support_stream.next_batch(), device)
            images += len(support[1]) * cfg.inner_steps
            if cfg.meta_learner == "reptile":
                task_results.append(reptile_task_delta(module, params, support, inner, penalty, **fw))
                continue
            query = _to(query_stream.next_batch(), device)
            images += len(query[1])
            task_grad = second_order_task_gradient if cfg.maml_order == 2 else fomaml_task_gradient
            task_results.append(task_grad(module, params, support, query, inner, penalty, **fw))
        direction = mean_dicts([r[0] for r in task_results])
        losses.append(float(np.mean([r[1] for r in task_results])))
        if cfg.meta_learner == "reptile":
            with torch.no_grad():
                for name, p in named:
                    if is_arch(name) and opt_a is None:
                        continue
                    p.add_(direction[name], alpha=cfg.reptile_lr_alpha if is_arch(name) else cfg.reptile_lr_w)
            continue
        for name, p in named:
            p.grad = direction[name]
        _add_proximal(anchors, proximal_mu)
        _clip(weight_params, cfg.grad_clip)
        opt_w.step()
        if opt_a is not None:
            opt_a.step()
        for _, p in named:  # module.zero_grad(set_to_none=True) without walking the modules again
            p.grad = None
    return LocalResult(len(support_stream.data), float(np.mean(losses)), cfg.local_meta_iters, images)


# ---------------------------------------------------------------------------------------------
# FedNAS: MiLeNAS-style first-order search, plain softmax, no MAML, no pruning


def fednas_local_search(
    model: SearchModel,
    data: ClientData,
    cfg: RunConfig,
    plan: RoundPlan,
    generator: torch.Generator,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> LocalResult:
    """Per minibatch: alpha step on grad(L_val) + grad(L_train), then the weight step on L_train."""
    model.train()
    settings = RelaxSettings(tau=1.0, mode="softmax", noise=False, threshold=0.0)
    train_stream = BatchStream(data.train, cfg.batch_size, generator)
    val_stream = BatchStream(data.query, cfg.batch_size, generator)
    opt_w, opt_a = meta_optimizers(model, cfg, plan.lr_w)
    steps = local_epochs(cfg, plan) * train_stream.batches_per_epoch
    anchors = _anchor(model.net, proximal_mu)
    penalty = cost_penalty(cfg, plan)  # the same cost term as FedMetaNAS's, on the alpha step
    losses, images = [], 0
    for _ in range(steps):
        xv, yv = _to(val_stream.next_batch(), device)
        xt, yt = _to(train_stream.next_batch(), device)
        images += len(yv) + len(yt)
        opt_w.zero_grad(set_to_none=True)
        opt_a.zero_grad(set_to_none=True)
        arch_loss = F.cross_entropy(model(xv, settings), yv)
        if penalty is not None:
            arch_loss = arch_loss + penalty(dict(model.named_parameters()))
        arch_loss.backward(inputs=list(model.arch.parameters()))
        train_loss = F.cross_entropy(model(xt, settings), yt)
        train_loss.backward()  # adds lambda=1 x grad_alpha(L_train) and gives grad_w(L_train)
        _add_proximal(anchors, proximal_mu)
        _clip(model.net.parameters(), cfg.grad_clip)
        opt_a.step()
        opt_w.step()
        losses.append(float(train_loss.detach()))
    return LocalResult(len(data.train), float(np.mean(losses)), steps, images)


# ---------------------------------------------------------------------------------------------
# FedAvg on a fixed network (the FedAvg baseline and FedNAS retraining)


def train_fixed(
    net: nn.Module,
    data: ClientData,
    cfg: RunConfig,
    plan: RoundPlan,
    generator: torch.Generator,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> LocalResult:
    """SGD over the round's local epochs (the phase's own: FedAvg's or FedNAS retraining's)."""
    net.train()
    stream = BatchStream(data.pool, cfg.batch_size, generator)  # no split to hold out: all training data
    opt = weight_optimizer(net, cfg, plan.lr_w)
    steps = local_epochs(cfg, plan) * stream.batches_per_epoch
    anchors = _anchor(net, proximal_mu)
    losses, images = [], 0
    for _ in range(steps):
        x, y = _to(stream.next_batch(), device)
        images += len(y)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        _add_proximal(anchors, proximal_mu)
        _clip(net.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    return LocalResult(len(data.pool), float(np.mean(losses)), steps, images)


def local_epochs(cfg: RunConfig, plan: RoundPlan) -> int:
    return cfg.local_epochs if plan.local_epochs is None else plan.local_epochs


# ---------------------------------------------------------------------------------------------
# Which local training a round runs: one signature, one table keyed by (phase kind, method)

LocalTrainer = Callable[
    [nn.Module, ClientData, RunConfig, RoundPlan, torch.Generator, torch.device, float], LocalResult
]

LOCAL_TRAINING: dict[tuple[str, str], LocalTrainer] = {
    ("search", "fedmetanas"): fedmetanas_local_search,
    ("search", "fednas"): fednas_local_search,
    ("fixed", "fednas"): train_fixed,  # retraining the searched genotype
    ("fixed", "fedavg"): train_fixed,
}


def local_trainer(kind: str, method: str) -> LocalTrainer:
    """The local training of a ``kind`` phase ("search", "fixed") of ``method``, looked up per round."""
    try:
        return LOCAL_TRAINING[(kind, method)]
    except KeyError:
        raise ValueError(
            f"no local training for a {kind!r} phase of {method!r}: add it to training.LOCAL_TRAINING"
        ) from None


# ---------------------------------------------------------------------------------------------
# Evaluation and personalization


def eval_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of the evaluation batches of n examples. The networks' BatchNorm uses batch
    statistics, so an example alone in its batch would be normalised on itself: a 1-example tail
    joins the previous batch (which then holds batch_size + 1), and a split of exactly one example
    is refused (DataError) rather than scored that way."""
    if batch_size < 2:
        raise DataError(f"eval-batch-size must be >= 2 (BatchNorm uses batch statistics); got {batch_size}")
    if n == 1:
        raise DataError(
            "cannot evaluate a split of 1 example: BatchNorm uses batch statistics, so it would be normalised "
            "on itself; every evaluated split needs >= 2 examples (raise min-partition-size or "
            "local-test-fraction for a client's local test split, or test-subset)"
        )
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


@torch.no_grad()
def evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor], data: ImageData, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Accuracy and mean loss, over batches of >= 2 examples (``eval_batches``)."""
    correct, loss_sum, n = 0, 0.0, len(data)
    for start, stop in eval_batches(n, batch_size):
        x = data.x[start:stop].to(device)
        y = data.y[start:stop].to(device)
        logits = forward(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1)}


def personalize_fixed(
    net: nn.Module, data: ClientData, cfg: RunConfig, generator: torch.Generator, device: torch.device
) -> dict[str, float]:
    """Local test accuracy of the deployed network before and after ``personalize-steps`` SGD steps at
    ``personalize-lr`` on the client's training data: one protocol for every method (FedMetaNAS's
    derived network, FedNAS's retrained one, FedAvg's), independent of any method's own step sizes."""
    before = evaluate(net, data.test, cfg.eval_batch_size, device)
    if cfg.personalize_steps == 0:
        return {"accuracy-before": before["accuracy"], "accuracy-after": before["accuracy"]}
    stream = BatchStream(data.pool, cfg.batch_size, generator)
    params = {k: v for k, v in net.named_parameters()}
    adapted = inner_adapt(
        net,
        params,
        lambda _: _to(stream.next_batch(), device),
        InnerLoop(cfg.personalize_steps, cfg.personalize_lr, 0.0),
    )
    after = evaluate(lambda x: functional_call(net, adapted, (x,)), data.test, cfg.eval_batch_size, device)
    return {"accuracy-before": before["accuracy"], "accuracy-after": after["accuracy"]}
