"""fastglow: a fast, memory-frugal Glow for PyTorch, a drop-in for rosinality/glow-pytorch."""

__version__ = "0.1.0"

from .cuda_graph import CudaGraphStep  # noqa: E402
from .checks import checked_bits_per_dim as bits_per_dim  # noqa: E402
from .checks import checked_z_shapes as z_shapes  # noqa: E402
from .model import Glow  # noqa: E402

__all__ = ["Glow", "CudaGraphStep", "bits_per_dim", "z_shapes", "__version__"]
