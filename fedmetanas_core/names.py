"""The search space's vocabulary, shared by the supernet, the genotype, the server and the reports.

Plain names and no torch, so that the run config and the report pages (both torch-free) use the same
spelling as the networks: op names, cell types, edge keys and architecture parameter names.

A ``SearchModel`` holds two submodules, ``net`` (network weights) and ``arch`` (architecture logits),
so every state-dict key starts with ``NET_PREFIX`` or ``ARCH_PREFIX``; every split keys on it.
"""

from __future__ import annotations

PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
# every op a space may name: DARTS's set (the default) and a full 3x3 convolution (ReLU-conv-BN, as
# NAS-Bench-201's), which mixes channels at every tap: where a budget is large, it buys capacity that
# the separable ops, cheap per MAC, cannot at the same width (docs/cost-aware.md)
KNOWN_OPS = (*PRIMITIVES, "conv_3x3")
CELL_TYPES = ("normal", "reduce")
NORMS = ("batch", "group")  # the ops' normalisation (fedmetanas_core.space.ops.norm_layer)
COST_KINDS = ("macs", "params", "latency-ms")  # what a budget limits (fedmetanas_core.method.budget)
NET_PREFIX = "net."
ARCH_PREFIX = "arch."


def is_arch(name: str) -> bool:
    """True for an architecture logit's name (``arch.*``), False for a network weight's (``net.*``)."""
    return name.startswith(ARCH_PREFIX)


def edge_key(dst: int, src: int) -> str:
    """An edge's name: ``"3<-1"`` = node 3 takes node 1 as input (nodes 0 and 1 are the cell's inputs)."""
    return f"{dst}<-{src}"


def arch_param_name(kind: str, cell_type: str, node: int | None = None) -> str:
    """State-dict name of an architecture tensor, as the SearchModel exposes it."""
    return f"{ARCH_PREFIX}alpha.{cell_type}" if kind == "alpha" else f"{ARCH_PREFIX}beta.{cell_type}-{node}"
