"""Embeddings out: exact nearest-neighbour search and the retrieval metrics, sharded embedding, validation during
training, the evaluation folder, inference and the portable index. Imports the layers below (core to data)."""
