"""Deprecated alias of :mod:`fastglow.backends.triton` (kept only for scripts that still import it; imports
triton)."""

from .backends.triton import *  # noqa: F401,F403
from .backends.triton import __all__  # noqa: F401
