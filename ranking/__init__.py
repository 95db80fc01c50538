"""deep-ranking: fine-grained image similarity with deep ranking (Wang et al. 2014).

The Python API (imported on first use, so ``import ranking`` stays light):

    model = ranking.load("runs/my-run")        # or an index folder, a checkpoint folder, an exported .safetensors
    model.spec                                 # its identity (ranking.ModelSpec): network and preprocessing
    vectors = model.embed(["a.jpg", pil_image, uint8_tensor])   # FloatTensor [N, D]
    index = ranking.Index.load("my-index")     # written by `ranking index`
    results = index.search(["query.jpg"], k=5)  # per image: [Result(rank, distance, item), ...]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["EmbeddingModel", "Index", "ModelSpec", "load"]

if TYPE_CHECKING:
    from ranking.learning.models import ModelSpec
    from ranking.retrieval.indexfolder import Index
    from ranking.retrieval.inference import EmbeddingModel, load

_LAZY = {
    "load": "ranking.retrieval.inference",
    "EmbeddingModel": "ranking.retrieval.inference",
    "Index": "ranking.retrieval.indexfolder",
    "ModelSpec": "ranking.learning.models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ranking' has no attribute {name!r}")
