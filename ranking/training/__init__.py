"""The training loop's parts, which ``ranking/train.py`` puts together: the network and its optimizer (``parts``), one
optimizer step (``step``), why the loop stops (``policies``), where records go (``metrics``) and when checkpoints are
written (``checkpointing``). Imports every layer below; its input comes from ``ranking.data.loader``."""
