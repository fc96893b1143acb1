"""A numpy array seen through the torch.Tensor attributes the connector's layout code reads (no torch needed)."""
from __future__ import annotations

import numpy as np


class FakeTensor:
    """``shape``, ``dtype``, ``device`` (``type``, ``index``), ``stride()``, ``element_size()``, ``data_ptr()``."""

    class _Device:
        def __init__(self, kind: str) -> None:
            self.type, self.index = kind, None

    def __init__(self, array: np.ndarray, kind: str = "cpu") -> None:
        self.array, self.shape, self.dtype, self.device = array, array.shape, array.dtype, self._Device(kind)

    def stride(self):
        return tuple(s // self.array.itemsize for s in self.array.strides)

    def element_size(self) -> int:
        return self.array.itemsize

    def data_ptr(self) -> int:
        return self.array.ctypes.data
