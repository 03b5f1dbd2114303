"""fastglow.kernels: fused Triton kernels for Glow (ActNorm + 1x1 conv + coupling, squeeze, LU weight).

Shipped from the repository's top-level ``kernels/`` directory as the ``fastglow.kernels`` package.
"""
