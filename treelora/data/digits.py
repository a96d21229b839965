"""``split-digits``: the 8x8 handwritten digits bundled with scikit-learn (1,797 images, UCI optical-recognition
data; notice in ``treelora/data/files/DIGITS_NOTICE.txt``) as a class-incremental image stream."""

from __future__ import annotations

import io
from importlib import resources

import numpy as np
import torch

from treelora.data.stream import DataError, Stream, check_count, class_incremental_split

# Pixel values in the data run 0..16 (counts of set pixels in 4x4 blocks of the 32x32 original).
PIXEL_MAX = 16.0


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped digits: images (1797, 1, 8, 8) float32 scaled to [0, 1], labels (1797,) int64."""
    raw = resources.files("treelora.data").joinpath("files", "digits.npz").read_bytes()
    with np.load(io.BytesIO(raw)) as f:
        images, labels = f["images"], f["labels"]
    x = torch.from_numpy(images.astype(np.float32) / PIXEL_MAX).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def split_digits(classes_per_task: int = 2, test_fraction: float = 0.3, seed: int = 0) -> Stream:
    """Digits 0-9 in tasks of ``classes_per_task`` classes (default 5 tasks: 0/1, 2/3, ..., 8/9).

    Args:
        classes_per_task: 1, 2, 5 or 10.
        test_fraction: share of each class held out for testing (stratified; the split is fixed by ``seed``).
        seed: seeds the held-out split. The class order is always 0..9.
    """
    check_count("classes_per_task", classes_per_task, optional=False)
    if classes_per_task not in (1, 2, 5, 10):
        raise DataError(f"classes_per_task must divide the 10 digit classes (1, 2, 5 or 10), got {classes_per_task}")
    x, y = load_digits_tensors()
    stream = class_incremental_split(
        x,
        y,
        classes_per_task,
        test_fraction=test_fraction,
        class_order=list(range(10)),
        class_names=[str(d) for d in range(10)],
        seed=seed,
        name="split-digits",
        input_kind="image",
    )
    stream.info.update({"source": "scikit-learn digits (UCI)", "test_fraction": test_fraction})
    return stream
