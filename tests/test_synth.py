"""The synthetic archive: official layout with the quirks of real copies, deterministic, classes learnable."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from ranking.core.errors import ConfigError
from ranking.data.archive import Archive
from ranking.synth import class_style, main, write_synthetic_archive


def jpegs(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist() if n.endswith(".JPEG")}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = write_synthetic_archive(tmp_path / "a.zip", classes=3, train_per_class=4, val_per_class=2, test_count=2)
    b = write_synthetic_archive(tmp_path / "b.zip", classes=3, train_per_class=4, val_per_class=2, test_count=2)
    c = write_synthetic_archive(tmp_path / "c.zip", classes=3, train_per_class=4, val_per_class=2, test_count=2, seed=1)
    assert a.read_bytes() == b.read_bytes()
    assert jpegs(a).keys() == jpegs(c).keys()
    assert all(jpegs(a)[n] != jpegs(c)[n] for n in jpegs(a))
    assert not list(tmp_path.glob(".*tmp*"))


def test_official_layout_with_the_quirks_of_real_copies(synth_zip):
    with zipfile.ZipFile(synth_zip) as z:
        names = set(z.namelist())
        words = z.read("tiny-imagenet-200/words.txt")
        wnids = z.read("tiny-imagenet-200/wnids.txt").decode().split()
        modes = [Image.open(io.BytesIO(z.read(n))).mode for n in names if n.endswith(".JPEG")]
    assert "tiny-imagenet-200/.DS_Store" in names and "tiny-imagenet-200/val/val_annotations.txt" in names
    assert b"\r\n" in words and not words.endswith(b"\n")
    assert wnids != sorted(wnids) and len(wnids) == 6
    assert 0 < modes.count("L") < len(modes) / 10 and set(modes) == {"L", "RGB"}
    with Archive(synth_zip) as archive:
        assert [len(archive.samples(s)) for s in ("train", "val", "test")] == [240, 60, 10]
        val_labels = [s.label for s in archive.samples("val")]
        assert [val_labels.count(c) for c in range(6)] == [10] * 6


def test_images_vary_within_a_class_and_the_classes_are_learnable(synth_zip):
    """Every image is distinct, yet a nearest-centroid classifier on tiny colour thumbnails beats chance easily."""
    with Archive(synth_zip) as archive:

        def features(split):
            rows = [
                (
                    np.asarray(
                        Image.open(io.BytesIO(archive.read(s.file))).convert("RGB").resize((8, 8)), dtype=np.float32
                    ).ravel(),
                    s.label,
                )
                for s in archive.samples(split)
            ]
            return np.stack([r[0] for r in rows]), np.array([r[1] for r in rows])

        train_x, train_y = features("train")
        val_x, val_y = features("val")
    assert len({x.tobytes() for x in train_x}) == len(train_x)
    centroids = np.stack([train_x[train_y == c].mean(0) for c in range(6)])
    predicted = np.argmin(((val_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == val_y).mean() > 0.4  # chance is 1/6; raw pixels of moving shapes are a weak feature


def test_neighbouring_classes_differ_in_every_attribute():
    styles = [class_style(c) for c in range(252)]
    assert len(set(styles)) == 252
    for a, b in zip(styles, styles[1:]):
        assert a.shape != b.shape and a.hue != b.hue and a.texture != b.texture


def test_cli_writes_the_zip_and_rejects_bad_counts(tmp_path, capsys):
    out = tmp_path / "demo.zip"
    assert (
        main(
            [
                "--out",
                str(out),
                "--classes",
                "2",
                "--train-per-class",
                "3",
                "--val-per-class",
                "1",
                "--test-count",
                "0",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    with Archive(out) as archive:
        assert [len(archive.samples(s)) for s in ("train", "val", "test")] == [6, 2, 0]
    with pytest.raises(ConfigError, match="classes must be between 2"):
        main(["--out", str(tmp_path / "bad.zip"), "--classes", "1"])
    assert not (tmp_path / "bad.zip").exists()


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ranking", "synth", "--out", str(tmp_path / "x.zip"), "--train-per-class", "0"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["ranking synth: error: train_per_class must be at least 1; got 0"]
    assert not list(tmp_path.iterdir())
