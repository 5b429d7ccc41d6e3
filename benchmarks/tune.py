"""Equal-budget hyper-parameter search for every method, scored on validation data, never the test set.

    python -m benchmarks.tune --preset digits --trials 6
    python -m benchmarks.tune --preset cifar10-cpu --trials 3 -c "num-server-rounds=20"
    python -m benchmarks.tune --preset digits --report-only     # tables from the stored studies
    python -m benchmarks.tune --preset cifar10-cpu --range fedavg.local-epochs=4,8,12,16 --out DIR --docs PAGE

Each method gets its own Optuna study (TPE sampler, median pruner) in one SQLite file per preset
(``benchmarks/results/tune/<preset>.db``), so a study resumes where it stopped and every trial can
be queried. A trial is a real run of the app through Flower's simulation engine with the preset,
the method's table and the trial's values; the server evaluates on ``eval-split = "validation"``:
the union of the clients' local test splits, carved from the training data and never trained on.
The objective is the deployed model's mean validation accuracy over the run's last 3 rounds; a
trial whose accuracy so far, read from its ``rounds.jsonl`` while it runs, falls below the median
of earlier trials at the same round is stopped (pruned). Every method gets the same number of
trials over the ranges in ``SEARCH_SPACES`` (``--range`` widens one where a study's best sat at its
edge; a study stores the ranges it searched); ``docs/tuning-<preset>.md`` (``--docs``) gets the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fedmetanas", "fednas", "fedavg")
LAST_ROUNDS = 3

# (kind, low, high[, log]) or ("choice", [values]); the ranges every method is tuned over.
SEARCH_SPACES: dict[str, dict[str, tuple]] = {
    "fedmetanas": {
        "outer-lr-w": ("float", 0.02, 0.3, True),
        "inner-lr-w": ("float", 0.001, 0.1, True),
        "outer-lr-alpha": ("float", 0.005, 0.3, True),
        "local-meta-iters": ("choice", [4, 8, 12, 16]),
        "discrete-round": ("choice", [3, 4, 6, 8]),
    },
    "fednas": {
        "outer-lr-w": ("float", 0.02, 0.3, True),
        "outer-lr-alpha": ("float", 0.005, 0.3, True),
        "local-epochs": ("choice", [1, 2, 3, 4]),
        "retrain-local-epochs": ("choice", [1, 2, 4, 6]),
    },
    "fedavg": {
        "outer-lr-w": ("float", 0.02, 0.3, True),
        "weight-decay": ("float", 1e-5, 3e-3, True),
        "local-epochs": ("choice", [1, 2, 4, 6, 8]),
    },
}


def parse_range(text: str) -> tuple[str, str, tuple]:
    """``method.key=low..high`` (a float range, log-scaled as the default's) or ``method.key=a,b,c``
    (choices): one widened range, for a study that found its best at the edge of the default."""
    name, sep, values = text.partition("=")
    method, dot, key = name.partition(".")
    if not sep or not dot or method not in SEARCH_SPACES or key not in SEARCH_SPACES[method]:
        raise ValueError(
            f"--range {text!r}: expected METHOD.KEY=LOW..HIGH or METHOD.KEY=A,B,C with a key of SEARCH_SPACES"
        )
    default = SEARCH_SPACES[method][key]
    try:
        if default[0] == "float":
            low, _, high = values.partition("..")
            spec: tuple = ("float", float(low), float(high), default[3])
            if not 0 < spec[1] < spec[2]:
                raise ValueError
        else:
            spec = ("choice", [json.loads(v) for v in values.split(",")])
    except ValueError:
        raise ValueError(f"--range {text!r}: bad values for {key} (default {_describe(default)})") from None
    return method, key, spec


def search_space(method: str, ranges: dict[str, dict[str, tuple]] | None = None) -> dict[str, tuple]:
    return {**SEARCH_SPACES[method], **((ranges or {}).get(method, {}))}


def suggest(trial, method: str, space: dict[str, tuple] | None = None) -> dict[str, Any]:
    values = {}
    for key, spec in (space or SEARCH_SPACES[method]).items():
        if spec[0] == "float":
            values[key] = trial.suggest_float(key, spec[1], spec[2], log=spec[3])
        else:
            values[key] = trial.suggest_categorical(key, spec[1])
    return values


def _toml(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def trial_command(
    preset: str, method: str, values: dict[str, Any], out: Path, overrides: list[str], clients: int
) -> list[str]:
    cmd = [sys.executable, "-m", "harness.simulation", "--clients", str(clients), "--results-dir", str(out)]
    cmd += ["-c", str(ROOT / "conf" / f"{preset}.toml"), "-c", f'method="{method}"']
    cmd += [x for o in overrides for x in ("-c", o)]
    scoring = f'eval-split="validation" num-partitions={clients} checkpoint=false fraction-evaluate=0.0'
    cmd += ["-c", scoring, "-c", " ".join(f"{k}={_toml(v)}" for k, v in values.items())]
    return cmd


def read_rounds(out: Path) -> list[dict[str, Any]]:
    path = out / "rounds.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return rows


def objective_value(rows: list[dict[str, Any]]) -> float:
    accs = [r["accuracy"] for r in rows[-LAST_ROUNDS:]]
    return float(sum(accs) / len(accs))


def _stop(proc: subprocess.Popen) -> None:
    """Stop a trial's run and everything it started (its own process group: Ray's workers too)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_trial(
    trial, preset: str, method: str, out_root: Path, overrides: list[str], clients: int, space: dict[str, tuple]
) -> float:
    import optuna

    values = suggest(trial, method, space)
    out = out_root / "trials" / preset / f"{method}-{trial.number:03d}"
    cmd = trial_command(preset, method, values, out, overrides, clients)
    log_path = out_root / "trials" / preset / f"{method}-{trial.number:03d}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{method} trial {trial.number}] {values}", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        reported = 0
        try:
            while True:
                done = proc.poll() is not None
                rows = read_rounds(out)
                for step in range(reported, len(rows)):
                    trial.report(float(rows[step]["accuracy"]), step)
                    reported = step + 1
                    if trial.should_prune():
                        print(
                            f"[{method} trial {trial.number}] pruned at round {step + 1}: {rows[step]['accuracy']:.4f}",
                            flush=True,
                        )
                        raise optuna.TrialPruned()
                if done:
                    break
                time.sleep(2.0)
        finally:
            if proc.poll() is None:
                _stop(proc)
    if proc.returncode != 0 or not (out / "summary.json").is_file():
        raise RuntimeError(f"trial run failed (exit {proc.returncode}); see {log_path}")
    value = objective_value(read_rounds(out))
    summary = json.loads((out / "summary.json").read_text())
    trial.set_user_attr("total_time_s", summary["total_time_s"])
    trial.set_user_attr("images_per_client_round", summary.get("images_per_client_round"))
    print(f"[{method} trial {trial.number}] validation accuracy (last {LAST_ROUNDS} rounds) {value:.4f}", flush=True)
    return value


def storage_url(out_root: Path, preset: str) -> str:
    return f"sqlite:///{out_root / f'{preset}.db'}"


def load_study(preset: str, method: str, out_root: Path, create: bool = True):
    import optuna

    name = f"{preset}-{method}"
    # A sampler seeded alike in every process would draw a resumed study's first values again.
    storage = optuna.storages.RDBStorage(storage_url(out_root, preset))
    known = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
    sampler = optuna.samplers.TPESampler(seed=known.get(name, 0), n_startup_trials=3)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=4)
    if create:
        return optuna.create_study(
            study_name=name, storage=storage, direction="maximize", sampler=sampler, pruner=pruner, load_if_exists=True
        )
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


def close_interrupted_trials(study) -> list[int]:
    """Mark trials still "running" from a process that died (machine shut down, killed) as failed, so
    they neither count towards the budget nor stay "running" in the tables. One tuning process per
    method and preset at a time: this would also close a live process's trial."""
    import optuna

    closed = [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for number in closed:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    if closed:
        print(
            f"[{study.study_name}] trial(s) {', '.join(map(str, closed))} left running by a stopped process: "
            f"marked failed",
            flush=True,
        )
    return closed


def finished_trials(study) -> list:
    """Complete or pruned trials: what counts towards a method's trial budget."""
    import optuna

    return [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


def preset_values(preset: str, method: str, space: dict[str, tuple], overrides: list[str]) -> dict[str, Any]:
    """The preset's own values of the keys a method is tuned over (its table in ``conf/<preset>.toml``
    with the study's overrides): enqueued as one trial, so the report shows where the preset stands."""
    from harness.cli import resolve_run_config

    flat, _ = resolve_run_config([str(ROOT / "conf" / f"{preset}.toml"), *overrides, f'method="{method}"'])
    values = {k: flat[k] for k in space}
    outside = [k for k, v in values.items() if not _within(space[k], v)]
    if outside:
        raise SystemExit(f"--enqueue-preset: the preset's {', '.join(outside)} lie outside the {method} ranges")
    return values


def _within(spec: tuple, value: Any) -> bool:
    return spec[1] <= value <= spec[2] if spec[0] == "float" else value in spec[1]


def study_space(study, method: str, ranges: dict[str, dict[str, tuple]] | None = None) -> dict[str, tuple]:
    """The ranges a study searches: fixed by its first run (stored with it), so a resumed study and
    its report never mix ranges."""
    stored = study.user_attrs.get("ranges")
    if stored is not None:
        space = {k: tuple(v) for k, v in stored.items()}
        if ranges is not None and space != search_space(method, ranges):
            raise SystemExit(f"{study.study_name}: the stored study searched other ranges; use another --out")
        return space
    return search_space(method, ranges)


def tune(
    preset: str,
    methods: list[str],
    trials: int,
    out_root: Path,
    overrides: list[str],
    clients: int,
    ranges: dict[str, dict[str, tuple]] | None = None,
    enqueue_preset: bool = False,
) -> None:
    out_root.mkdir(parents=True, exist_ok=True)
    for method in methods:
        study = load_study(preset, method, out_root)
        space = study_space(study, method, ranges)
        if "ranges" not in study.user_attrs:
            study.set_user_attr("ranges", {k: list(v) for k, v in space.items()})
            if enqueue_preset:  # a new study: its first trial is the preset's setting
                values = preset_values(preset, method, space, overrides)
                study.enqueue_trial(values, user_attrs={"enqueued": "the preset's setting"})
        close_interrupted_trials(study)
        todo = trials - len(finished_trials(study))
        if todo > 0:
            study.optimize(
                lambda t, method=method, space=space: run_trial(t, preset, method, out_root, overrides, clients, space),
                n_trials=todo,
                catch=(RuntimeError,),
            )


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _describe(spec: tuple) -> str:
    if spec[0] == "float":
        return f"[{spec[1]:g}, {spec[2]:g}]{' log' if spec[3] else ''}"
    return "{" + ", ".join(map(str, spec[1])) + "}"


def report(
    preset: str,
    methods: list[str],
    out_root: Path,
    overrides: list[str],
    docs: Path | None = None,
    flags: str = "",
) -> dict[str, Any]:
    """``flags``: the command's other options, shown as given (``--range``, ``--out``, ...)."""
    import optuna

    lines = [
        f"# Tuning on `{preset}`",
        "",
        f"`python -m benchmarks.tune --preset {preset}{flags}" + "".join(f" -c '{o}'" for o in overrides) + "` "
        f"(TPE sampler, median pruner; this page written with Optuna {optuna.__version__}; studies in "
        f"`{_shown(out_root / f'{preset}.db')}`). Objective: the deployed model's mean accuracy over the "
        f"last {LAST_ROUNDS} rounds on the validation split (the clients' local test splits, carved "
        f"from the training data; the test set is never used). The seconds column is each trial's "
        f"wall-clock time on a machine that was often shared with other jobs.",
        "",
    ]
    best_all = {}
    for method in methods:
        study = load_study(preset, method, out_root, create=False)
        space = study_space(study, method)
        keys = list(space)
        lines += [
            f"## {method}",
            "",
            "Ranges: " + ", ".join(f"`{k}` {_describe(space[k])}" for k in keys),
            "",
        ]
        lines += [
            "| trial | state | " + " | ".join(keys) + " | validation acc | s |",
            "|---|---|" + "---|" * (len(keys) + 2),
        ]
        for t in study.trials:
            value = (
                t.value
                if t.value is not None
                else (max(t.intermediate_values.values()) if t.intermediate_values else None)
            )
            shown = f"{value:.4f}" if value is not None else "-"
            if t.state == optuna.trial.TrialState.PRUNED:
                shown = f"pruned at round {max(t.intermediate_values) + 1}" if t.intermediate_values else "pruned"
            params = " | ".join(
                f"{t.params[k]:.4g}" if isinstance(t.params.get(k), float) else str(t.params.get(k, "-")) for k in keys
            )
            secs = t.user_attrs.get("total_time_s")
            state = t.state.name.lower() + (f" ({t.user_attrs['enqueued']})" if t.user_attrs.get("enqueued") else "")
            lines.append(f"| {t.number} | {state} | {params} | {shown} | {f'{secs:.0f}' if secs else '-'} |")
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        finished = finished_trials(study)
        failed = len(study.trials) - len(finished)
        lines += [
            "",
            f"{len(finished)} finished trials (complete or pruned: the budget every method gets)"
            + (
                f"; {failed} that did not finish (a run stopped from outside: machine shut down or stopped "
                "by hand) count for nothing and are shown for the record."
                if failed
                else "."
            ),
        ]
        if complete:
            best = max(complete, key=lambda t: t.value)
            best_all[method] = {"trial": best.number, "value": best.value, "params": best.params}
            lines += [
                "",
                f"Best: trial {best.number}, validation accuracy {best.value:.4f}: "
                + ", ".join(f"`{k} = {_toml(v)}`" for k, v in best.params.items()),
                "",
            ]
    (out_root / f"{preset}-best.json").write_text(json.dumps(best_all, indent=2))
    docs = docs or ROOT / "docs" / f"tuning-{preset}.md"
    docs.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return best_all


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--trials", type=int, default=6, help="trials per method (the same for every method)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tune")
    parser.add_argument("-c", "--run-config", action="append", default=[], help="extra overrides for every trial")
    parser.add_argument(
        "--range",
        action="append",
        default=[],
        help="widen one range: METHOD.KEY=LOW..HIGH or METHOD.KEY=A,B,C (stored with the study)",
    )
    parser.add_argument("--docs", type=Path, help="the report's page (default docs/tuning-<preset>.md)")
    parser.add_argument(
        "--enqueue-preset",
        action="store_true",
        help="a new study's first trial is the preset's own setting (one of the --trials, for every method)",
    )
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in SEARCH_SPACES]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    ranges: dict[str, dict[str, tuple]] = {}
    for text in args.range:
        try:
            method, key, spec = parse_range(text)
        except ValueError as err:
            parser.error(str(err))
        ranges.setdefault(method, {})[key] = spec
    out = args.out.resolve()
    if not args.report_only:
        tune(args.preset, methods, args.trials, out, args.run_config, args.clients, ranges, args.enqueue_preset)
    flags = "".join(f" --range {r}" for r in args.range) + (" --enqueue-preset" if args.enqueue_preset else "")
    if args.methods != ",".join(METHODS):
        flags += f" --methods {args.methods}"
    if out != (ROOT / "benchmarks" / "results" / "tune").resolve():
        flags += f" --out {_shown(out)}"
    if args.docs:
        flags += f" --docs {_shown(args.docs.resolve())}"
    report(args.preset, methods, out, args.run_config, args.docs, flags)


if __name__ == "__main__":
    main()
