"""`fedmetanas` from an installed wheel, not from the checkout (issue 27, defect 2).

`flwr run` builds its FAB from an app directory holding the app's pyproject.toml. A plain
`pip install .` puts only the packages in site-packages, so the CLI must find the app's files
through the installed package. The fast test builds that layout by hand (the packages plus what
the wheel's force-include maps) and checks what `flwr run` would get; the slow, opt-in test
(``FEDMETANAS_SLOW_TESTS=1``) builds the real wheel, installs it into a fresh venv that reuses this
venv's packages (nothing downloaded but the build backend, no editable path), and runs
`fedmetanas check` and a 1-round, 2-client `fedmetanas run` from outside the source tree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLOW = os.environ.get("FEDMETANAS_SLOW_TESTS") == "1"


def _clean_env(**extra: str) -> dict[str, str]:
    """No path into a checkout: PYTHONPATH (the test runner's) and the venv activation go."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **extra}


def _installed_layout(site: Path) -> None:
    """What installing the wheel puts in site-packages: the packages it lists, and the files its
    force-include maps (read from pyproject.toml, as hatchling reads them)."""
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    for name in wheel["packages"]:
        shutil.copytree(ROOT / name, site / name, ignore=shutil.ignore_patterns("__pycache__"))
    for source, target in wheel.get("force-include", {}).items():
        (site / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / source, site / target)


# Runs `fedmetanas run` from SITE with `flwr run` replaced by what Flower 1.42's `flwr run` does
# with the app directory first (validate its pyproject.toml, build the FAB), then "fails" the run.
_PROBE = r"""
import json, subprocess, sys, zipfile, io
from pathlib import Path

site = sys.argv[1]
sys.path.insert(0, site)
from harness import cli

assert cli.__file__.startswith(site), cli.__file__
seen = {}

REAL_POPEN = subprocess.Popen


class FlwrRun:
    def __new__(cls, cmd, **kwargs):  # only flwr is faked: the CLI's pgrep (its private SuperLink) runs for real
        return super().__new__(cls) if cmd[0] == "flwr" else REAL_POPEN(cmd, **kwargs)

    def __init__(self, cmd, **kwargs):
        from flwr.cli.build import build_fab_from_disk
        from flwr.cli.config_utils import load_and_validate

        app = Path(cmd[2])
        seen["app"] = str(app)
        try:
            config, _ = load_and_validate(app / "pyproject.toml")
            seen["components"] = config["tool"]["flwr"]["app"]["components"]
            seen["fab"] = sorted(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist())
        except Exception as exc:
            seen["error"] = f"{type(exc).__name__}: {exc}"
        self.stdout, self.returncode = iter([]), 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

subprocess.Popen = FlwrRun
rc = cli.main(["run", "-c", 'results-dir="%s"' % sys.argv[2]])
seen["rc"], seen["app_left"] = rc, Path(seen.get("app", "/nonexistent")).exists()
print("PROBE " + json.dumps(seen))
"""


@pytest.mark.slow  # the CLI in a subprocess, from an installed layout
def test_run_finds_the_flower_app_from_the_installed_package(tmp_path):
    site, elsewhere = tmp_path / "site-packages", tmp_path / "elsewhere"
    site.mkdir(), elsewhere.mkdir()
    _installed_layout(site)
    assert not (site / "pyproject.toml").exists()  # what broke `fedmetanas run` after `pip install .`
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(site), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=_clean_env(),
        timeout=300,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert line, done.stdout[-3000:] + done.stderr[-3000:]
    seen = json.loads(line[len("PROBE ") :])
    assert "error" not in seen, seen["error"]
    app = Path(seen["app"])
    assert not app.is_relative_to(ROOT) and not app.is_relative_to(site), app  # built for the run, from site
    assert seen["components"] == {"serverapp": "server_app.app:app", "clientapp": "client_app.app:app"}
    for needed in (
        "server_app/app.py",
        "client_app/app.py",
        "flower_records/__init__.py",
        "fedmetanas_core/method/training.py",
    ):
        assert needed in seen["fab"], (needed, seen["fab"])
    assert not any(name.startswith("harness/") for name in seen["fab"])  # SuperNodes run the apps, not the harness
    assert not any("flower_app" in name or "__pycache__" in name for name in seen["fab"])
    assert seen["rc"] == 1 and not seen["app_left"]  # the "failed" run; the built directory is removed


def test_run_without_any_app_files_fails_in_one_line(tmp_path, monkeypatch, capsys):
    from harness import cli

    monkeypatch.setattr(cli, "SOURCE_ROOT", tmp_path)
    monkeypatch.setattr(cli, "PACKAGED_PYPROJECT", tmp_path / "missing" / "pyproject.toml")
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("flwr was started without an app"))
    assert cli.main(["run", "-c", f'results-dir="{tmp_path / "out"}"']) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "pyproject.toml" in err[0] and "--app" in err[0], err


# --- the real wheel in a fresh venv (opt-in) --------------------------------------------------------

TINY = (
    "num-server-rounds=1 local-meta-iters=1 min-available-nodes=2 min-train-nodes=2 batch-size=16 init-channels=4 "
    "train-subset=240 test-subset=120 personalize-steps=1 checkpoint=false torch-threads=1"
)


def _fresh_venv_with_the_wheel(tmp: Path) -> Path:
    """A venv whose only fedmetanas is the wheel built from this tree. Its dependencies are this
    venv's, reached through a .pth line (the .pth files in there, the editable install's among
    them, are not processed); Flower's commands get launchers bound to the new interpreter."""
    wheels = tmp / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", str(ROOT), "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp,
        env=_clean_env(),
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheel = next(wheels.glob("fedmetanas-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "_reuse_parent_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "--no-warn-conflicts",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp,
        env=_clean_env(),
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    from importlib.metadata import distribution

    for ep in distribution("flwr").entry_points:
        if ep.group == "console_scripts":
            module, _, attr = ep.value.partition(":")
            script = venv / "bin" / ep.name
            script.write_text(f"#!{python}\nimport sys\nfrom {module} import {attr}\nsys.exit({attr}())\n")
            script.chmod(0o755)
    return venv


@pytest.fixture
def stop_superlink():
    """Stops, by PID, every process whose command line holds the given FLWR_HOME, and their children."""
    homes: list[Path] = []
    yield homes.append
    from fedmetanas_core.util.processes import stop_pids

    for home in homes:
        found = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True).stdout.split()
        pids, todo = [], [int(p) for p in found]
        while todo:
            pid = todo.pop()
            if pid not in pids and pid != os.getpid():
                pids.append(pid)
                todo += [
                    int(c)
                    for c in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
                ]
        stop_pids(pids, grace_s=10)


@pytest.mark.slow
@pytest.mark.skipif(
    not SLOW, reason="builds the wheel and runs it from a fresh venv (~2 min); set FEDMETANAS_SLOW_TESTS=1"
)
def test_the_installed_wheel_checks_and_runs_outside_the_source_tree(tmp_path, stop_superlink):
    if not sys.platform.startswith("linux"):
        pytest.skip("venv layout and process tracking assume Linux")
    sys.path.insert(0, str(Path(__file__).parent))
    from ray_cluster import PortPool

    venv = _fresh_venv_with_the_wheel(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ports, home = PortPool(), tmp_path / "flwr-home"
    parent_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(
        [str(venv / "bin")] + [p for p in os.environ.get("PATH", "").split(os.pathsep) if p != parent_bin]
    )
    env = _clean_env(
        PATH=path,
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(ports.one()),
        FLWR_LOCAL_CONTROL_API_PORT=str(ports.one()),
    )
    env = {k: v for k, v in env.items() if not k.startswith("RAY_ADDRESS")}

    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import json, fedmetanas_core, server_app, client_app, flower_records, harness; print(json.dumps("
            "[m.__file__ for m in (fedmetanas_core, server_app, client_app, flower_records, harness)]))",
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        check=True,
    )
    for file in json.loads(where.stdout):
        assert Path(file).is_relative_to(venv), file  # the wheel's copy, not a checkout

    fedmetanas = str(venv / "bin" / "fedmetanas")
    check = subprocess.run(
        [fedmetanas, "check", "-c", "seed=3"], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300
    )
    assert check.returncode == 0 and "run config OK" in check.stdout, check.stdout + check.stderr

    out = tmp_path / "out"
    stop_superlink(home)
    run = subprocess.run(
        [fedmetanas, "run", "--num-supernodes", "2", "-c", f'{TINY} results-dir="{out}"'],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    assert "finished:completed" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_clients"] == 2 and summary["rounds"] == 1
    # the run's own SuperLink (a private FLWR_HOME, not the caller's) installed the FAB built out of the
    # installed package and ran the app from it
    installed = re.search(r"Successfully installed fedmetanas to (\S+)", run.stdout)
    assert installed and "fedmetanas-flwr-" in installed.group(1) and str(home) not in installed.group(1), run.stdout[
        -3000:
    ]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec and click, inside Flower's build
def test_a_checkout_run_sends_the_same_fab_built_from_a_copy_of_only_its_files(tmp_path):
    """`flwr run` walks every file under the app directory to build the FAB (a checkout's .venv:
    ~50,000 files, ~3 s of every run's start-up); `fedmetanas run` stages only pyproject.toml and what
    its fab-include patterns match. Flower's own build gives the same bytes from the copy."""
    from flwr.cli.build import build_fab_from_disk

    from harness.cli import stage_app

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copyfile(ROOT / "pyproject.toml", checkout / "pyproject.toml")
    for name in ("fedmetanas_core", "server_app", "client_app", "flower_records"):
        shutil.copytree(ROOT / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    junk_files = (".venv/lib/site.py", "benchmarks/results/run/summary.json", "server_app/__pycache__/stale.py")
    for junk in junk_files:
        (checkout / junk).parent.mkdir(parents=True, exist_ok=True)
        (checkout / junk).write_text("junk\n")
    staged = stage_app(checkout, tmp_path / "staged")
    assert staged != checkout and (staged / "server_app" / "app.py").is_file()
    assert not (staged / ".venv").exists() and not (staged / "benchmarks").exists()
    assert not list(staged.rglob("__pycache__"))
    assert build_fab_from_disk(staged) == build_fab_from_disk(checkout)

    bare = tmp_path / "bare"  # no fab-include: nothing says what to leave out, so the directory as it is
    bare.mkdir()
    (bare / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.flwr.app]\npublisher = "x"\n')
    assert stage_app(bare, tmp_path / "unused") == bare
