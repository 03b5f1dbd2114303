"""fastglow.kernels: fused Triton kernels for Glow, one file per op (Liger-Kernel's pairing: ``@triton.jit``
kernels, then host launchers, then the op registered with ``torch.library`` in the ``fastglow::`` namespace
with its fake implementation and autograd formula).

Importing this package imports triton: :mod:`fastglow.backends` does so lazily, once, so ``TRITON_INTERPRET``
can still be decided before the first Triton use.
"""
