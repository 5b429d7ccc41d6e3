"""Round time against the work: clients training per round, and image size (issue 26).

    python -m benchmarks.scale                      # 10, 30, 100 clients; 8, 16, 32 pixel images
    python -m benchmarks.scale --clients 10,30 --image-sizes 16 --rounds 4 --json scale.json

Each point is one real ``fedmetanas run`` (local SuperLink, Ray simulation engine) of the
``cifar10-cpu`` preset (``benchmarks.framework.measure``) in which every simulated client trains in
every round, the cell discrete from round 2 on (``framework.LATE``): round 1 trains the full
supernet and starts Ray's actors, later rounds are the discrete cell's, the rounds that make up
most of a run. The client count varies at the preset's 16-pixel images; the image size at the
smallest client count. A client takes a fixed number of meta-steps of one minibatch each, smaller
than the batch size where its partition is (more clients share the same training subset), so a
round's work is counted as the images its clients trained on (``client-images-mean`` x replies)
times the pixels; the table says how far the round's time follows it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from benchmarks.framework import LATE, PRESET, measure

PRESET_IMAGE_SIZE = int(tomllib.loads(PRESET.read_text())["image-size"])


def point(result: dict[str, Any], image_size: int) -> dict[str, Any]:
    """One run's row: round 1, and the median of its later (discrete-cell) rounds: the first of
    them also meets the derived network's shapes for the first time in each actor."""
    later = result["rounds"][1:]
    actors = result["actors"]
    return {
        "clients": result["clients"],
        "image_size": image_size,
        "round_1_s": result["rounds"][0]["round_s"],
        "discrete_round_s": statistics.median(r["round_s"] for r in later),
        "discrete_client_s_per_actor": statistics.median(r["client_s_sum"] / actors for r in later),
        "discrete_overhead_share": statistics.median(r["overhead_share"] for r in later),
        "discrete_images": statistics.median(r["images"] for r in later),
        "round_s": [r["round_s"] for r in result["rounds"]],
        "run_s": result["run_s"],
    }


def table(points: list[dict[str, Any]]) -> list[str]:
    """Each point against the first (10 clients, the preset's images): the work's growth (pixels the
    clients trained on in a discrete round) and the time's."""
    base = points[0]

    def pixels(p: dict[str, Any]) -> float:
        return p["discrete_images"] * p["image_size"] ** 2

    lines = [
        "| clients training per round | image size | round 1 s (supernet, actors start) | discrete round s "
        "| images trained on a discrete round | client work per core s | Flower + Ray share "
        "| work (pixels) vs first row | discrete round time vs first row |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p['clients']} | {p['image_size']} | {p['round_1_s']:.1f} | {p['discrete_round_s']:.2f} "
            f"| {p['discrete_images']:,.0f} | {p['discrete_client_s_per_actor']:.2f} "
            f"| {100 * p['discrete_overhead_share']:.1f} % | {pixels(p) / pixels(base):.2f}x "
            f"| {p['discrete_round_s'] / base['discrete_round_s']:.2f}x |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="10,30,100", help="clients, all training every round")
    ap.add_argument("--image-sizes", default="8,16,32", help="image sizes, at the smallest client count")
    ap.add_argument("--rounds", type=int, default=4, help="round 1 plus the discrete rounds (their median)")
    ap.add_argument("-c", "--run-config", action="append", default=[], help="extra overrides")
    ap.add_argument("--json", type=Path, default=None, help="write the points here")
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (round 1 is the supernet's)")
    clients = [int(c) for c in args.clients.split(",")]
    sizes = [int(s) for s in args.image_sizes.split(",")]
    runs = [(n, PRESET_IMAGE_SIZE) for n in clients]
    runs += [(min(clients), s) for s in sizes if s != PRESET_IMAGE_SIZE]
    points = []
    with tempfile.TemporaryDirectory(prefix="fedmetanas-scale-") as tmp:
        for n, size in runs:
            print(f"[scale] {n} clients, {size}x{size} images, {args.rounds} rounds ...", flush=True)
            extra = [*args.run_config, LATE, f"image-size={size}"]
            result = measure(n, args.rounds, Path(tmp) / f"clients-{n}-size-{size}", extra, trainers=n)
            points.append(point(result, size))
            print(json.dumps(points[-1]), flush=True)
    print("\n".join(table(points)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(points, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
