"""Knowledge distillation across device tiers (``tier-distill``): a larger tier's clients train on
targets mixed from their labels and the next smaller tier's deployed network's predictions.

Why: a large tier's extra channels learn from its own clients only, which under label skew see some
classes rarely; the smaller tier's network is trained by every client (the sandwich rule), so its
predicted probabilities carry what the other clients' data taught it into the large tier's
training, while no device runs a network over its budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..data import ClientData, ImageData
from ..space import SearchModel
from .training import decided_network, eval_batches

Forward = Callable[[torch.Tensor], torch.Tensor]


def deployed_forward(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> Forward | None:
    """The network a tier deploys, from what its clients received: a fixed network as it is, a
    supernet's derived network once its masks leave one cell; None while the cell is undecided
    (there is no deployed network to learn from yet)."""
    if not isinstance(model, SearchModel):
        return model
    return decided_network(model, masks, next(model.parameters()).device)


@torch.no_grad()
def soft_targets(forward: Forward, data: ImageData, weight: float, batch_size: int, device: torch.device) -> ImageData:
    """``data`` with each label replaced by ``(1 - weight) * one-hot + weight * teacher probabilities``:
    cross-entropy against it is the label loss plus ``weight`` times the KL divergence to the teacher
    (up to a constant)."""
    probs = torch.cat(
        [F.softmax(forward(data.x[a:b].to(device)), dim=1).cpu() for a, b in eval_batches(len(data), batch_size)]
    )
    onehot = F.one_hot(data.y, data.num_classes).to(probs.dtype)
    return replace(data, y=(1 - weight) * onehot + weight * probs)


def distilled(data: ClientData, forward: Forward, weight: float, batch_size: int, device: torch.device) -> ClientData:
    """The client's training splits with soft targets from ``forward``; its test split untouched.
    Each split is scored in its own batches; a split of fewer than two examples is scored together
    with the other (BatchNorm on batch statistics would normalise one example on itself)."""
    if min(len(data.train), len(data.query)) >= 2:
        train = soft_targets(forward, data.train, weight, batch_size, device)
        query = soft_targets(forward, data.query, weight, batch_size, device)
        return ClientData(train, query, data.test, data.partition_id)
    pool = soft_targets(forward, data.pool, weight, batch_size, device)
    n = len(data.train)
    return ClientData(
        replace(data.train, y=pool.y[:n]), replace(data.query, y=pool.y[n:]), data.test, data.partition_id
    )
