"""Pixels in: image sources (the archive, class folders), decoding, the shard streams, triplet sampling and the
augmentation on the training device. Imports the layers below (core, folders, learning)."""
