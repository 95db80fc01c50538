"""deep-ranking: fine-grained image similarity with deep ranking (Wang et al. 2014)."""

__version__ = "0.1.0"
