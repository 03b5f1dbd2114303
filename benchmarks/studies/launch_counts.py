"""Count kernel launches of one Glow level, per flow step: fused Triton kernels vs eager PyTorch ops.

Every non-view aten op is (at least) one kernel launch on a GPU; Triton launches are counted at the
JIT entry point. Usage: ``TRITON_INTERPRET=1 python -m benchmarks.studies.launch_counts`` (CPU) or natively on CUDA.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VIEW_OPS = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "slice", "select",
            "split", "chunk", "unsqueeze", "squeeze", "detach", "alias", "as_strided", "split_with_sizes",
            "unbind", "_reshape_alias", "empty", "empty_like", "new_empty", "empty_strided"}  # no kernel


class _AtenCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0
        self.inside_triton = False  # the interpreter's own tensor copies are not launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_triton and func.overloadpacket.__name__ not in VIEW_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_launches():
    """Yields a dict whose 'triton' and 'aten' entries count launches made inside the block."""
    import triton.runtime.interpreter as interp
    import triton.runtime.jit as jit
    counts = {"triton": 0, "aten": 0}
    mode = _AtenCounter()
    patched = []
    for cls in (jit.JITFunction, getattr(interp, "InterpretedFunction", None)):
        if cls is not None and "run" in vars(cls):
            original = cls.run

            def run(self, *args, _original=original, **kwargs):
                counts["triton"] += 1
                mode.inside_triton = True
                try:
                    return _original(self, *args, **kwargs)
                finally:
                    mode.inside_triton = False
            cls.run = run
            patched.append((cls, original))
    try:
        with mode:
            yield counts
    finally:
        counts["aten"] = mode.count
        for cls, original in patched:
            cls.run = original


def level_launches(backend: str, n_flow: int = 4, affine: bool = True, device: str = "cpu",
                   permutation: str = "conv"):
    """Launches per flow step of one level's forward and backward (plain autograd), for ``backend`` and the
    step's ``permutation`` ("conv", "shuffle", "reverse")."""
    import fastglow
    from fastglow.backends import select_backend
    from fastglow.backends.triton import coupling_net_raw
    from fastglow.testing import initialized_model
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8, device=device) - 0.5
    model = initialized_model(fastglow.Glow(3, n_flow, 1, affine=affine, hidden_channels=16, backend=backend,
                                            reversible=False, permutation=permutation).to(device), x, sigma=0.1)
    flows = model.blocks[0].flows
    steps = select_backend(backend, x)
    xs = steps.squeeze(x).requires_grad_()
    with count_launches() as fwd:
        y, logdet = steps.forward(flows, xs)
    loss = y.square().sum() + logdet.sum()
    with count_launches() as bwd:
        loss.backward()
    counts = {k: {"forward": fwd[k] / n_flow, "backward": bwd[k] / n_flow} for k in ("triton", "aten")}
    y_a = xs.detach()[:, : xs.shape[1] // 2].requires_grad_()  # the coupling network alone, for reference
    with count_launches() as nn_fwd:
        h_raw, _ = coupling_net_raw(flows[0].coupling, y_a)
    with count_launches() as nn_bwd:
        h_raw.sum().backward()
    counts["coupling_network_aten"] = {"forward": nn_fwd["aten"], "backward": nn_bwd["aten"]}
    return counts


if __name__ == "__main__":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    print(json.dumps({b: level_launches(b, device=device) for b in ("eager", "triton")}, indent=1))
