"""The launch capture (benchmarks/compile_gate/launch_capture.py) sees what the model launches: the mix
precision of every mix kernel."""

import pytest
import torch

import fastglow
from benchmarks.compile_gate.launch_capture import Recorder
from fastglow.testing import initialized_model


def test_mix_precision_reaches_every_mix_launch():
    """Glow(mix_precision="tf32x3"): every float32 launch of a mix kernel gets INPUT_PRECISION="tf32x3" (forward,
    backward, reverse); float64 stays "ieee"; anything else is refused. (The interpreter ignores the precision,
    so its numerical effect is estimated in benchmarks/studies/tf32_emulation.py.)"""
    for dtype, expected in ((torch.float32, "tf32x3"), (torch.float64, "ieee")):
        torch.manual_seed(0)
        x = torch.rand(2, 3, 8, 8, dtype=dtype) - 0.5
        model = initialized_model(fastglow.Glow(3, 2, 2, hidden_channels=8, backend="triton",
                                                mix_precision="tf32x3").to(dtype), x)
        rec = Recorder(execute=True)
        with rec.patched():
            log_p, logdet, z = model(x)
            (log_p + logdet).sum().backward()
            with torch.no_grad():
                model.reverse(z, reconstruct=True)
        mixes = [dict(l.spec.constexprs) for l in rec.launches]
        mixes = [c for c in mixes if "INPUT_PRECISION" in c and c.get("HAS_MIX", True)]
        assert len(mixes) > 6 and {c["INPUT_PRECISION"] for c in mixes} == {expected}
    with pytest.raises(ValueError, match="mix_precision"):
        fastglow.Glow(3, 2, 2, mix_precision="tf32")
