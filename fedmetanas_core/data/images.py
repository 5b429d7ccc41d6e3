"""A labelled image set held as two tensors, and the error every data problem raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class DataError(ValueError):
    """Bad data or data settings; message names the setting/path."""


@dataclass(frozen=True)
class ImageData:
    """A labelled image set held as two tensors, so batching is plain indexing."""

    x: torch.Tensor  # float32 [N, C, H, W], normalised with the dataset's train mean/std
    y: torch.Tensor  # int64 [N]; or float [N, classes]: soft targets (method.tier_distill)
    classes: tuple[str, ...]
    mean: tuple[float, ...] | None = None  # the normalisation, for models deployed outside the app
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        soft = self.y.ndim == 2 and self.y.is_floating_point() and self.y.shape[1] == len(self.classes)
        if self.x.ndim != 4 or not (self.y.ndim == 1 or soft) or self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"ImageData needs x [N, C, H, W] and y [N]; got x {tuple(self.x.shape)}, y {tuple(self.y.shape)}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x.shape[2])

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: Any) -> ImageData:
        """Examples at the given integer indices (array, list or tensor), as copies."""
        if isinstance(idx, torch.Tensor):
            index = idx.long()
        else:  # copied, so read-only arrays (e.g. cached partitions) are fine
            index = torch.from_numpy(np.array(idx, dtype=np.int64).reshape(-1))
        return ImageData(self.x[index], self.y[index], self.classes, self.mean, self.std)

    @staticmethod
    def concat(parts: list[ImageData]) -> ImageData:
        """Splits of one dataset joined in order (same classes and normalisation as the first)."""
        first = parts[0]
        return ImageData(
            torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), first.classes, first.mean, first.std
        )
