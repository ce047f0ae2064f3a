"""The programs a user types exist and answer ``--help``.

The console scripts come from ``[project.scripts]`` in pyproject.toml; `make venv`
installs the project in editable mode, which puts them next to the interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = Path(sysconfig.get_path("scripts"))


def declared_scripts() -> dict[str, str]:
    """name -> "module:function" as declared in pyproject.toml."""
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        scripts: dict[str, str] = tomllib.load(f)["project"]["scripts"]
    return scripts


def editable_install() -> metadata.Distribution:
    """The installed jvpn distribution; skips the test unless it is an editable install.

    Looks only in site-packages: the repository root is on sys.path too, and the
    ``jvpn.egg-info`` that an editable build leaves there is not the installed metadata.
    """
    site_dirs = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    found = list(metadata.distributions(name="jvpn", path=site_dirs))
    if not found:
        pytest.skip("jvpn is not installed in this interpreter (run `make venv`)")
    dist = found[0]
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if not direct_url.get("dir_info", {}).get("editable"):
        pytest.skip("jvpn is not installed in editable mode (run `make venv`)")
    return dist


def run_program(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a console script: the installed one if present, else its entry point directly."""
    script = SCRIPTS_DIR / name
    if script.exists():
        command = [str(script), *args]
    else:
        module, func = declared_scripts()[name].split(":")
        code = (
            f"import sys; sys.argv = {[name, *args]!r}; "
            f"from {module} import {func}; sys.exit({func}())"
        )
        command = [sys.executable, "-c", code]
    return subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )


HELP_OPTIONS: dict[str, list[str]] = {
    "jvpn-tui": ["--demo", "--headless", "--config", "--attach", "--duration", "--theme"],
    "jvpn-gateway": ["--config", "--metrics"],
    "jvpn-keygen": ["--out", "--force"],  # docs/gateway.md
    "jvpn-impair": ["--listen", "--upstream", "--control", "--seed"],  # docs/impair.md
    "jvpn": ["--socket", "--gateway", "status", "watch", "switch", "terminate"],  # control.md
}
"""Every program a user types, with the options its documentation uses."""


def test_pyproject_declares_the_programs() -> None:
    assert set(declared_scripts()) == set(HELP_OPTIONS)


def test_console_scripts_are_installed_and_current() -> None:
    dist = editable_install()
    installed = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert installed == declared_scripts(), "installed entry points are stale: run `make venv`"
    missing = [name for name in declared_scripts() if not (SCRIPTS_DIR / name).is_file()]
    assert not missing, f"console scripts missing from {SCRIPTS_DIR}: {missing}"


@pytest.mark.parametrize(("program", "options"), list(HELP_OPTIONS.items()))
def test_help_prints_usage(program: str, options: list[str]) -> None:
    """Each program is declared and answers --help (a missing module fails here)."""
    assert program in declared_scripts()
    proc = run_program(program, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.lower().startswith("usage:"), proc.stdout
    assert program in proc.stdout
    for option in options:
        assert option in proc.stdout, f"{program} --help does not document {option}"


def project_version() -> str:
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
    return version


@pytest.mark.parametrize("program", list(HELP_OPTIONS))
def test_version_names_the_program_and_the_projects_version(program: str) -> None:
    editable_install()  # the version comes from the installed distribution's metadata
    proc = run_program(program, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{program} {project_version()}"


ABBREVIATED: dict[str, list[str]] = {
    "jvpn-tui": ["--conf", "client.toml", "--headless"],
    "jvpn-gateway": ["--conf", "gateway.toml"],
    "jvpn-keygen": ["--ou=alice", "genkey"],
    "jvpn-impair": ["--liste", "127.0.0.1:0", "--upstream", "127.0.0.1:9"],
    "jvpn": ["--sock=/run/jvpn/client.sock", "status"],
}
"""A prefix of a real option (--config, --out, --listen) with what else the program needs."""


@pytest.mark.parametrize(("program", "argv"), list(ABBREVIATED.items()))
def test_an_abbreviated_option_is_refused(program: str, argv: list[str]) -> None:
    """No program guesses which option a prefix means (a typo must not pick one)."""
    proc = run_program(program, *argv)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert argv[0] in proc.stderr, proc.stderr


def test_the_ui_without_a_terminal_refuses_in_one_line_naming_headless_and_attach() -> None:
    """Started with no terminal (a service, nohup, a pipe), jvpn-tui says what to use
    (--headless, then --attach from a terminal) and exits 2 (configuration/usage error,
    docs/client.md) instead of drawing into a file."""
    script = SCRIPTS_DIR / "jvpn-tui"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "jvpn_tui"]
    proc = subprocess.run(
        [*command, "--demo"], cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jvpn-tui: "), proc.stderr
    assert "--headless" in lines[0] and "--attach" in lines[0] and "terminal" in lines[0]
