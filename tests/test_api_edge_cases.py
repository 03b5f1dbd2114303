"""The library: the first training step is constant-memory too, an impossible backend is refused at
construction (item 10), and messages that name the problem (item 11)."""

import numpy as np
import pytest
import torch

import fastglow


def _saved_bytes_and_step(model, x):
    """Bytes of the distinct tensors autograd keeps for backward in one forward, after running its backward."""
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), tuple(t.shape), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        log_p, logdet, _ = model(x)
    (-(log_p + logdet)).mean().backward()
    return sum(saved.values())


def test_item10_the_first_training_step_keeps_no_more_activations_than_the_next():
    torch.manual_seed(0)
    model = fastglow.Glow(3, 16, 2, hidden_channels=16)
    x = torch.rand(4, 3, 16, 16) - 0.5
    first = _saved_bytes_and_step(model, x)  # ActNorm's init happens here
    assert model.actnorm_initialized()
    assert torch.isfinite(model.reconstruction_error()).all()  # the reversible backward carried the gradient
    second = _saved_bytes_and_step(model, x)
    assert first <= 1.05 * second, (first, second)  # was 8x: plain autograd on the first batch


def test_item10_the_first_forward_is_the_initialising_one():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8) - 0.5
    fast, ref = fastglow.Glow(1, 4, 2, hidden_channels=8), fastglow.reference.Glow(1, 4, 2, hidden_channels=8)
    ref.load_state_dict(fast.state_dict())
    for a, b in zip(fast(x), ref(x)):  # grad enabled: init without activations, then the reversible path
        for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(fast.state_dict().values(), ref.state_dict().values()))


def test_item10_an_impossible_backend_is_refused_at_construction(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU-only machine as users have it
    if torch.cuda.is_available():
        assert fastglow.Glow(1, 1, 2, hidden_channels=4, backend="triton").backend == "triton"
    else:
        with pytest.raises(ValueError, match="backend='triton' needs a CUDA device"):
            fastglow.Glow(1, 1, 2, hidden_channels=4, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fastglow.Glow(1, 1, 2, hidden_channels=4, backend="triton").backend == "triton"


def test_item11_numpy_scalars_are_accepted_and_a_fresh_classify_warns():
    model = fastglow.Glow(1, 1, 2, affine=np.bool_(True), conv_lu=np.bool_(False), hidden_channels=4,
                          n_classes=4)
    assert model.blocks[0].flows[0].coupling.affine is True  # a Python bool, as rosinality's
    x = torch.rand(2, 1, 8, 8) - 0.5
    with pytest.warns(RuntimeWarning, match="ActNorm layers are not initialised"):
        model.classify(x)
    assert model.sample(3, y=np.int64(3), img_size=8).shape == (3, 1, 8, 8)  # as an int does
    with pytest.raises(TypeError, match="affine must be a bool, got str"):
        fastglow.Glow(1, 1, 2, affine="yes")
    with pytest.raises(TypeError, match="got numpy.float64"):
        fastglow.Glow(1, 1, 2, reversible=np.float64(1))
