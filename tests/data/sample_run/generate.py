"""Regenerate this stored sample run: a real (tiny) FedMetaNAS simulation plus per-round op probabilities.

    cd /work/main && . .venv/bin/activate && python tests/data/sample_run/generate.py

It runs the real ServerApp/ClientApp in-process (``harness.simulation.run_in_process``). When the
server does not log them itself, it wraps ``SearchPhase.accept`` so that every search-round line of
``rounds.jsonl`` carries the keys the report reads for the alpha heatmaps (``op-probs``,
``primitives``, ``edges``), computed as genotype derivation computes them: the noise-free per-edge
softmax of the aggregated architecture logits, with the run's soft-pruning masks applied. Only the
small text files are kept here.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEEP = ("config.yaml", "rounds.jsonl", "summary.json", "genotype.yaml")
OVERRIDES = {
    "num-server-rounds": 5,
    "min-available-nodes": 3,
    "min-train-nodes": 3,
    "warmup-rounds": 1,
    "mask-start-round": 2,
    "local-meta-iters": 5,
    "seed": 0,
}


def op_prob_keys(space, arch_state: dict, masks: dict) -> dict:
    """The three keys rounds.jsonl carries per search round (what the server is meant to log)."""
    from fedmetanas_core.space import CELL_TYPES, arch_param_name, edge_key
    from fedmetanas_core.space.relaxation import probabilities

    probs = {}
    for cell_type in CELL_TYPES:
        name = arch_param_name("alpha", cell_type)
        p = probabilities(arch_state[name], masks.get(name))
        probs[cell_type] = [[round(float(v), 5) for v in row] for row in p.tolist()]
    return {
        "op-probs": probs,
        "primitives": list(space.primitives),
        "edges": [edge_key(j, i) for j, i in space.topology.edges],
    }


def main() -> None:
    from fedmetanas_core.federation.phases import SearchPhase
    from harness.simulation import run_in_process

    original = SearchPhase.accept

    def accept(self, server_round, state):
        metrics = original(self, server_round, state)
        if "op-probs" not in metrics:  # servers that already log them (SearchPhase.op_probabilities) are left alone
            metrics.update(op_prob_keys(self.space, self.arch_state(), self.masks))
        return metrics

    SearchPhase.accept = accept  # the ServerApp runs in this process (a thread), clients in Ray actors
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        run_in_process({**OVERRIDES, "results-dir": str(out)}, 3)
        missing = [f for f in KEEP if not (out / f).exists()]
        if missing:
            sys.exit(f"run did not write {missing}")
        for name in KEEP:
            shutil.copyfile(out / name, HERE / name)
    summary = json.loads((HERE / "summary.json").read_text())
    summary["results_dir"] = "tests/data/sample_run"
    (HERE / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    print("sample run written to", HERE)


if __name__ == "__main__":
    main()
