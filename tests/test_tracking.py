"""W&B's own mode rules decide (ranking.reporting.tracking.resolve_mode): each case in a fresh HOME and working folder,
with the real wandb settings files, netrc and environment, in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from harness import REPO

WANDB = Path(sys.executable).parent / "wandb"


def resolve(home: Path, env: dict[str, str] | None = None, requested: str = "") -> tuple[str, str]:
    """(mode printed by resolve_mode, its stderr) with HOME and the working folder in ``home``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    code = f"from ranking.reporting import tracking; print(tracking.resolve_mode({requested!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=home, capture_output=True, text=True, timeout=120,
                            env={**clean, "HOME": str(home), "PYTHONPATH": str(REPO), **(env or {})}, check=True)
    return result.stdout.strip(), result.stderr


@pytest.fixture
def home(tmp_path) -> Path:
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_nothing_configured_goes_offline_and_says_so(home):
    mode, said = resolve(home)
    assert mode == "offline"
    assert said.count("\n") == 1 and "no mode configured and no credentials" in said and "wandb sync" in said


@pytest.mark.parametrize("env", [{"WANDB_MODE": "online"}, {"WANDB_MODE": "disabled"},
                                 {"WANDB_API_KEY": "a" * 40}], ids=["WANDB_MODE online", "disabled", "API key"])
def test_the_environment_lets_wandb_decide(home, env):
    assert resolve(home, env) == ("None", "")


def test_wandb_offline_in_the_folder_lets_wandb_decide(home):
    subprocess.run([str(WANDB), "offline"], cwd=home, env={**os.environ, "HOME": str(home)}, check=True,
                   capture_output=True, timeout=120)
    mode, said = resolve(home)
    assert mode == "None" and "no mode configured" not in said  # (wandb itself names the settings file it read)


def test_wandb_login_credentials_let_wandb_decide(home):
    """`wandb login` writes the key into ~/.netrc for the W&B host; wandb online then needs no fallback."""
    code = "from wandb.sdk import wandb_setup; print(wandb_setup.singleton().settings.base_url)"
    base_url = subprocess.run([sys.executable, "-c", code], cwd=home, capture_output=True, text=True, check=True,
                              env={**os.environ, "HOME": str(home)}, timeout=120).stdout.strip()
    netrc = home / ".netrc"
    netrc.write_text(f"machine {urlsplit(base_url).hostname}\n  login user\n  password {'b' * 40}\n")
    netrc.chmod(0o600)
    assert resolve(home) == ("None", "")


def test_the_flag_wins(home):
    assert resolve(home, {"WANDB_MODE": "online"}, requested="disabled") == ("disabled", "")
