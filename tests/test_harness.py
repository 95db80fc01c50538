"""The test harness itself: which tests count as `system` (they start a process), the guard that fails any other test
that starts one, and the shared data's rule (skip without ../shared, fail under CI). The planted examples below are
read, never run: calling them would start the processes they are about."""

from __future__ import annotations

import _posixsubprocess
import multiprocessing
import multiprocessing.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.multiprocessing as mp

import harness
from harness import REPO, TESTS, ProcessGuard, cli_refusal, launch, process_start, process_start_of, shared_file

# ---------------------------------------------------------------------------------------------------------------
# planted examples for the static check


def starts_directly() -> None:
    subprocess.run(["true"], check=True)


def helper_that_starts(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True)


def starts_through_a_helper() -> None:
    helper_that_starts(["true"])


def starts_through_the_launcher() -> None:
    launch(["--steps", "1"])


def starts_through_a_local_import() -> None:
    import subprocess as sp

    sp.check_output(["true"])


def starts_a_pool() -> None:
    from multiprocessing import Pool

    with Pool(2) as pool:
        pool.map(abs, [1])


def starts_ranks() -> None:
    mp.start_processes(print, nprocs=2, start_method="spawn")


def starts_a_process_object() -> None:
    multiprocessing.Process(target=print).start()


def starts_through_a_closure():
    run = subprocess.Popen

    def inner() -> None:
        run(["true"])

    return inner


def recursive_helper(n: int) -> int:
    return 0 if n == 0 else recursive_helper(n - 1)


def only_names_subprocess_things() -> subprocess.CompletedProcess:
    """Mentions subprocess without starting anything: a constant and a result object are no process."""
    assert subprocess.PIPE != subprocess.STDOUT
    recursive_helper(3)
    return subprocess.CompletedProcess(["true"], 0)


def refuses_in_process(capsys) -> None:
    cli_refusal(capsys, "train", "--stesp", "4")  # the stage runs in this process: nothing to see


@pytest.mark.parametrize(
    "function,chain",
    [
        (starts_directly, "subprocess.run"),
        (starts_through_a_helper, "helper_that_starts -> subprocess.run"),
        (starts_through_a_local_import, "sp.check_output"),
        (starts_a_pool, "Pool"),
        (starts_ranks, "mp.start_processes"),
        (starts_a_process_object, "multiprocessing.Process"),
        (starts_through_a_closure(), "run"),
    ],
)
def test_the_static_check_follows_calls_through_helpers_imports_and_closures(function, chain):
    assert process_start(function) == chain


def test_the_launcher_of_real_ranks_is_seen_through_the_harness():
    assert (process_start(starts_through_the_launcher) or "").startswith("launch -> subprocess.")


@pytest.mark.parametrize("function", [only_names_subprocess_things, refuses_in_process, recursive_helper])
def test_code_that_starts_nothing_is_not_system(function):
    assert process_start(function) is None


def test_the_check_reads_the_tests_fixtures_too(pytester):
    """Collected items of a planted module: a test is system through a fixture that starts a process, also through
    another fixture that requests that one."""
    pytester.makepyfile(
        test_planted=textwrap.dedent("""
        import subprocess

        import pytest

        @pytest.fixture
        def server():
            with subprocess.Popen(["sleep", "60"]) as process:
                yield process

        @pytest.fixture
        def client(server, tmp_path):
            return tmp_path

        def test_plain(tmp_path):
            assert tmp_path

        def test_direct():
            subprocess.run(["true"])

        def test_through_fixtures(client):
            assert client
    """)
    )
    found = {item.name: process_start_of(item) for item in pytester.getitems(pytester.path / "test_planted.py")}
    assert found == {
        "test_plain": None,
        "test_direct": "subprocess.run",
        "test_through_fixtures": "fixture server: subprocess.Popen",
    }


# ---------------------------------------------------------------------------------------------------------------
# the guard


@pytest.fixture
def guard():
    """A guard of its own, wrapped around the session's (which also watches this test): it refuses first."""
    guard = ProcessGuard()
    guard.install()
    yield guard
    guard.uninstall()


STARTS = [  # each way to start a process, and how the guard names it
    (lambda: subprocess.run(["true"]), "subprocess: true"),
    (lambda: subprocess.check_output("echo hi", shell=True), "subprocess: echo hi"),
    (
        lambda: multiprocessing.get_context("fork").Process(target=print, name="planted").start(),
        "multiprocessing: ForkProcess planted",
    ),
    (lambda: mp.get_context("spawn").Process(target=print).start(), "multiprocessing: SpawnProcess"),
    (
        lambda: multiprocessing.util.spawnv_passfds(sys.executable, [sys.executable, "-c", "pass"], ()),
        f"fork_exec: {sys.executable} -c pass",
    ),  # how the resource tracker starts
    (lambda: os.system("true"), "os.system true"),
    (lambda: os.fork(), "os.fork"),
]


@pytest.mark.parametrize("start,what", STARTS, ids=[what for _, what in STARTS])
def test_the_guard_refuses_every_way_a_process_starts_before_it_starts(guard, start, what):
    with pytest.raises(pytest.fail.Exception, match="planted test started a process") as refused:
        with guard.refusing("planted test"):
            start()
    assert what in str(refused.value) and "not marked system: add @pytest.mark.system" in str(refused.value)
    assert len(guard.started) == 1


def test_a_refusal_swallowed_on_its_way_up_still_fails_the_test(guard):
    start, what = STARTS[0]
    with pytest.raises(pytest.fail.Exception, match=rf"planted test started a process \({what}\)"):
        with guard.refusing("planted test"):
            try:
                start()
            except BaseException:  # what a careless library might do
                pass


def test_uninstall_puts_the_originals_back():
    def current() -> tuple:
        return (
            subprocess.Popen.__init__,
            multiprocessing.process.BaseProcess.start,
            os.fork,
            os.system,
            _posixsubprocess.fork_exec,
        )

    before = current()
    guard = ProcessGuard()
    guard.install()
    assert all(now is not then for now, then in zip(current(), before))
    guard.uninstall()
    assert current() == before


# ---------------------------------------------------------------------------------------------------------------
# the shared data's rule


def test_shared_data_is_a_skip_without_ci_and_a_failure_under_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "SHARED", tmp_path / "shared")
    missing = tmp_path / "shared" / "data" / "x.zip"
    for ci in ("", "false"):
        monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.skip.Exception, match=f"{missing} is missing: this test needs ../shared"):
            shared_file("data/x.zip")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"{missing} is missing: .*; CI must have it"):
        shared_file("data/x.zip")
    missing.parent.mkdir(parents=True)
    missing.write_bytes(b"")
    assert shared_file("data/x.zip") == missing


PLANTED = """
import subprocess


def test_uses_the_real_data(mini_zip):
    assert mini_zip.is_file()


def test_starts_a_process_it_shows():
    subprocess.run(["true"], check=True)


def test_hides_a_process():
    getattr(subprocess, "r" + "un")(["true"])  # no static check can see this
"""


def planted_session(folder: Path, *flags: str, **env: str) -> dict[str, str]:
    """pytest on the planted module with this suite's conftest and setup.cfg: each test's outcome, and its message
    where it has one ("skipped: ...", "failure: ...", "error: ...")."""
    import xml.etree.ElementTree as ET

    (folder / "test_planted.py").write_text(PLANTED)
    report = folder / "report.xml"
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "RANKING_SHARED", "PYTEST_ADDOPTS")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(REPO / "setup.cfg"),
            "--rootdir",
            str(folder),
            "-p",
            "conftest",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            *flags,
            str(folder / "test_planted.py"),
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        env={**clean, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), **env},
    )
    assert report.is_file(), done.stdout + done.stderr
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        name = case.get("name", "").removeprefix("test_")
        results = [
            f"{child.tag}: {child.get('message', '')}" for child in case if child.tag in ("skipped", "failure", "error")
        ]
        outcomes[name] = results[0] if results else "passed"
    return outcomes


@pytest.mark.system  # runs pytest itself, twice
def test_a_session_without_shared_skips_its_tests_in_one_line_and_fails_them_under_ci(tmp_path):
    missing = tmp_path / "no-shared"
    message = f"{missing}/data/tiny-imagenet-mini.zip is missing: this test needs ../shared beside the repository"
    fast = planted_session(tmp_path, "-m", "not system", RANKING_SHARED=str(missing))
    assert fast.keys() == {"uses_the_real_data", "hides_a_process"}  # the static check marked the third system
    assert fast["uses_the_real_data"].startswith(f"skipped: {message}")
    assert (
        fast["hides_a_process"].startswith("failure: Failed: ")
        and "started a process (subprocess: true) but is not marked system" in fast["hides_a_process"]
    )
    full = planted_session(tmp_path, RANKING_SHARED=str(missing), CI="true")
    assert (
        full["uses_the_real_data"].startswith("error: ")
        and message in full["uses_the_real_data"]
        and "CI must have it" in full["uses_the_real_data"]
    )
    assert full["starts_a_process_it_shows"] == "passed" and full["hides_a_process"].startswith("failure: ")
