"""Three fixed trainings and an evaluation, through the command line only, so that the same script runs against any
commit: a refactor that moves code must log the same losses and give the same metrics.

    python bench/fixed_runs.py OUT.json                    # train, evaluate, write what they logged
    python bench/fixed_runs.py OUT.json --against REF.json  # and compare: exit 1 on the first difference

The trainings (6 steps each on a small synthetic archive, one process, fp32, no workers) are the batch sampler with
semi-hard mining, the paper sampler with the triplet-margin loss, and Smooth-AP; the first is then evaluated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAININGS = {
    "batch-semihard": ["--sampler", "batch", "--miner", "semihard", "--loss", "hinge"],
    "paper-triplet-margin": ["--sampler", "paper", "--loss", "triplet_margin", "--triplets-per-batch", "8"],
    "smooth-ap": ["--sampler", "batch", "--loss", "smooth_ap"],
}
COMMON = [
    "--config",
    str(REPO / "configs" / "smoke.yaml"),
    "--steps",
    "6",
    "--workers",
    "0",
    "--log-every",
    "1",
    "--classes-per-batch",
    "3",
    "--samples-per-class",
    "4",
    "--shuffle-buffer",
    "50",
    "--mixed-precision",
    "no",
    "--no-wandb",
    "--no-progress",
    "--checkpoint-every",
    "6",
]


def ranking(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, "-m", "ranking.cli", *args], check=True, env=env, stdout=subprocess.DEVNULL)


def measure(work: Path) -> dict:
    ranking(
        "synth",
        "--out",
        str(work / "synth.zip"),
        "--classes",
        "4",
        "--train-per-class",
        "24",
        "--val-per-class",
        "6",
        "--test-count",
        "4",
    )
    ranking("shards", str(work / "synth.zip"), "--out", str(work / "shards"), "--shard-size", "30", "--workers", "1")
    found: dict = {}
    for name, flags in TRAININGS.items():
        run = work / name
        ranking("train", *COMMON, *flags, "--shards", str(work / "shards"), "--run-dir", str(run))
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        # `train/loss`, or `loss` at commits before the train/ names: the same number either way
        found[name] = [
            record.get("train/loss", record.get("loss"))
            for record in records
            if "train/loss" in record or "loss" in record
        ]
    run = work / "batch-semihard"
    ranking(
        "evaluate",
        "--checkpoint",
        str(run),
        "--out",
        str(run / "eval"),
        "--workers",
        "0",
        "--mixed-precision",
        "no",
        "--batch-size",
        "32",
    )
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    found["evaluate"] = metrics["splits"]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--against", type=Path, help="a reference written by this script at another commit")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        found = measure(Path(work))
    args.out.write_text(json.dumps(found, indent=1))
    if args.against is None:
        return 0
    reference = json.loads(args.against.read_text())
    for key in reference:
        if found.get(key) != reference[key]:
            print(f"{key}: differs\n  reference {reference[key]}\n  now       {found.get(key)}")
            return 1
    print(f"same losses and metrics as {args.against}: {', '.join(reference)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
