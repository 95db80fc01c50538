"""Shared fixtures (a small synthetic archive and its shards, built once per test session; the real mini zip) and
the test tiers: every test that starts a process is marked `system` at collection (`pytest -m "not system"` is the
fast lane), and a guard fails any other test that starts one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from harness import SYSTEM, ProcessGuard, process_start_of, shared_file

pytest_plugins = ["pytester"]  # tests/test_harness.py collects planted test modules in this process

# Tests are CPU-only and share two cores: keep every process to one intra-op thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def mini_zip() -> Path:
    """The real 10-class subset in the official layout; skipped without ../shared, a failure under CI."""
    return shared_file("data/tiny-imagenet-mini.zip")


@pytest.fixture(scope="session")
def synth_zip(tmp_path_factory) -> Path:
    from ranking.synth import write_synthetic_archive

    path = tmp_path_factory.mktemp("synth") / "synth.zip"
    write_synthetic_archive(path, classes=6, train_per_class=40, val_per_class=10, test_count=10, seed=0)
    return path


@pytest.fixture(scope="session")
def synth_shards(synth_zip, tmp_path_factory) -> Path:
    """Synthetic shards with an odd number of train shards (240 samples / 50 = 5 shards)."""
    from ranking.shards import write_shards

    out = tmp_path_factory.mktemp("shards") / "synth"
    write_shards(synth_zip, out, shard_size=50, workers=1, seed=0, progress=False)
    return out


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Stages called in-process (evaluate, index, search) each make an Accelerator, as a process of their own would;
    Accelerate keeps its state per process and refuses another mixed precision, so each test starts afresh."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# ---------------------------------------------------------------------------------------------------------------
# test tiers

GUARD = ProcessGuard()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `system` every test whose code, helpers or fixtures visibly start a process."""
    for item in items:
        if not item.get_closest_marker(SYSTEM) and process_start_of(item):
            item.add_marker(SYSTEM)


def pytest_configure(config: pytest.Config) -> None:
    GUARD.install()


def pytest_unconfigure(config: pytest.Config) -> None:
    GUARD.uninstall()


def guarded(item: pytest.Item) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if item.get_closest_marker(SYSTEM) else GUARD.refusing(item.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with guarded(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with guarded(item):
        return (yield)
