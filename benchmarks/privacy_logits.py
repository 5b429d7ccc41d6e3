"""How much of a search update the architecture logits are, and which cell each DP run derived.

    python benchmarks/privacy_logits.py benchmarks/results/privacy/seed-0

Reads the runs ``benchmarks/privacy.py`` wrote: for each FedMetaNAS / FedNAS run, the median over
the search rounds in which the logits moved of the mean update norm (all arrays) and of the logits
alone (``update-norm-mean``, ``update-norm-arch-mean`` in rounds.jsonl), and the derived normal cell.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(root: Path) -> None:
    for method in ("fedmetanas", "fednas"):
        for run in sorted((root / method).glob("*/rounds.jsonl")):
            rows = [json.loads(line) for line in run.read_text().splitlines() if line.strip()]
            search = [r for r in rows if r["phase"] == "search" and r.get("update-norm-arch-mean")]
            total = statistics.median(r["update-norm-mean"] for r in search)
            arch = statistics.median(r["update-norm-arch-mean"] for r in search)
            genotype = json.loads((run.parent / "summary.json").read_text())["genotype"]
            cell = [[f"{e['op']}<-{e['input']}" for e in node] for node in genotype["normal"]] if genotype else None
            print(
                f"{method:10s} {run.parent.name:6s} {len(search):2d} search rounds with moving logits: median "
                f"update norm "
                f"{total:.3f}, logits alone {arch:.3f} ({arch / total:.0%}); normal cell {cell}"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
