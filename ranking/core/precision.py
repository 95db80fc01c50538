"""Which mixed precision a stage runs in: the stage's own flag, else Accelerate's choice, else the device's best.

1. ``--mixed-precision`` (or ``mixed_precision:`` in ``--config``) given: it wins.
2. Else Accelerate's own resolution: ``accelerate launch --mixed_precision``, the ``accelerate config`` file it reads,
   or ``ACCELERATE_MIXED_PRECISION`` in a process started without ``accelerate launch``. All three reach the
   process as ``ACCELERATE_MIXED_PRECISION`` (``accelerate launch`` sets it from its flag or config file).
3. Else (nothing set, as in ``ranking train`` or a submitit task): bf16 where the device computes it natively
   (GPUs of compute capability 8.0+, CPUs with AVX512-BF16 or AMX), fp16 on older GPUs (V100, T4), fp32 elsewhere.

``accelerate launch`` without a flag or a config file sets ``no`` itself (and says so in its warning); Accelerate
users expect that, so it stands. ``slurm/common.sh`` sets ``RANKING_PRECISION_DEFAULTED=1`` when it launched with
neither, so that its jobs get the device's choice (3) instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import cast

import torch

from ranking.core.config import Precision as PrecisionName

ENV = "ACCELERATE_MIXED_PRECISION"
LAUNCH_DEFAULTED = "RANKING_PRECISION_DEFAULTED"  # set by slurm/common.sh: the launcher's "no" was not a choice


@dataclass(frozen=True)
class Precision:
    value: PrecisionName  # "no" | "bf16" | "fp16" (what Accelerator gets)
    source: str  # where it came from, for the log

    def describe(self) -> str:
        return f"mixed precision {self.value} ({self.source})"


def uses_cpu() -> bool:
    """The device Accelerate will pick: the CPU when asked (ACCELERATE_USE_CPU) or when there is no GPU."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


def device_default() -> Precision:
    if uses_cpu():
        if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
            return Precision("bf16", "device default: the CPU computes bf16 natively")
        return Precision("no", "device default: the CPU has no native bf16")
    index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) >= (8, 0):
        return Precision("bf16", f"device default: GPU of compute capability {major}.{minor}")
    return Precision("fp16", f"device default: GPU of compute capability {major}.{minor} has no fast bf16")


def resolve(flag: PrecisionName | None) -> Precision:
    """The precision of this process (see the module's docstring for the order)."""
    if flag:
        return Precision(flag, "--mixed-precision")
    from_accelerate = os.environ.get(ENV, "").lower()
    if from_accelerate and not (from_accelerate == "no" and os.environ.get(LAUNCH_DEFAULTED) == "1"):
        return Precision(
            cast(PrecisionName, from_accelerate), f"Accelerate: accelerate launch's flag or config file, or {ENV}"
        )
    return device_default()


def for_inference(chosen: Precision) -> Precision:
    """fp16 autocast needs a GPU: on the CPU, evaluate in bf16 instead."""
    if chosen.value == "fp16" and uses_cpu():
        return Precision("bf16", f"{chosen.source}; fp16 needs a GPU, bf16 on the CPU instead")
    return chosen
