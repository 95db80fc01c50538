"""Install on a cluster (issue 19, build item 7): setup.cfg accepts the range of torch, torchvision and torchcodec
the code is tested with, so a cluster's own CUDA build of torch is kept; constraints.txt pins the CI machine's exact
versions and CI installs with it."""

from __future__ import annotations

import configparser
from importlib import metadata

from packaging.requirements import Requirement

from harness import REPO

PINNED = ("torch", "torchvision", "torchcodec")


def requirements() -> dict[str, Requirement]:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    lines = [line.split("#")[0].strip() for line in setup["options"]["install_requires"].splitlines()]
    return {(r := Requirement(line)).name: r for line in lines if line}


def constraints() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in (REPO / "constraints.txt").read_text().splitlines()]
    return dict(line.split("==") for line in lines if line)


def test_the_package_accepts_a_range_and_the_constraints_pin_one_version_in_it() -> None:
    wanted, pinned = requirements(), constraints()
    assert set(pinned) == set(PINNED)
    for name in PINNED:
        spec = wanted[name].specifier
        assert not any(s.operator == "==" for s in spec), f"{name}: setup.cfg pins it exactly: {spec}"
        assert spec.contains(pinned[name]), (name, str(spec), pinned[name])
        installed = metadata.version(name).split("+")[0]  # a CUDA build's local tag (+cu126) is the same release
        assert spec.contains(installed), (name, str(spec), installed)
        next_minor = ".".join([pinned[name].split(".")[0], str(int(pinned[name].split(".")[1]) + 1), "0"])
        assert not spec.contains(next_minor), f"{name} {next_minor} is untested but accepted"


def test_ci_runs_the_readmes_test_command_which_installs_the_pinned_versions() -> None:
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    readme = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(ci) == 1 and ci[0] in readme, "CI runs exactly one of the README's commands"
    assert all(" -c constraints.txt " in line for line in readme if "&&" in line), "both fresh-machine commands pin"
