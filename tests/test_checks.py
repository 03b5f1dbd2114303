"""Bad input is refused with a ValueError/TypeError naming the problem, before any computation."""

import pytest
import torch

import fastglow


@pytest.fixture
def model():
    return fastglow.Glow(3, 1, 2, hidden_channels=8)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(in_channel=0), ValueError, "in_channel"),
    (dict(in_channel=3.0), TypeError, "in_channel"),
    (dict(n_flow=0), ValueError, "n_flow"),
    (dict(n_block=-1), ValueError, "n_block"),
    (dict(n_block=True), TypeError, "n_block"),
    (dict(hidden_channels=0), ValueError, "hidden_channels"),
    (dict(affine="yes"), TypeError, "affine"),
    (dict(conv_lu=1), TypeError, "conv_lu"),
    (dict(reversible=None), TypeError, "reversible"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_constructor_arguments(kwargs, error, match):
    args = dict(in_channel=3, n_flow=1, n_block=2) | kwargs
    with pytest.raises(error, match=match):
        fastglow.Glow(**args)


@pytest.mark.parametrize("x,error,match", [
    (torch.zeros(3, 8, 8), ValueError, "4 dimensions"),
    (torch.zeros(1, 1, 3, 8, 8), ValueError, "4 dimensions"),
    (torch.zeros(2, 1, 8, 8), ValueError, "channels"),
    (torch.zeros(2, 3, 6, 8), ValueError, "multiples of 2\\*\\*n_block"),
    (torch.zeros(2, 3, 8, 10), ValueError, "multiples of 2\\*\\*n_block"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), TypeError, "floating dtype"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.int64), TypeError, "floating dtype"),
    (torch.zeros(0, 3, 8, 8), ValueError, "empty batch"),
    ([[0.0]], TypeError, "torch.Tensor"),
])
def test_forward_rejects_bad_images(model, x, error, match):
    with pytest.raises(error, match=match):
        model(x)
    assert not model.actnorm_initialized()  # nothing ran


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_forward_rejects_non_finite_images(model, bad):
    x = torch.zeros(2, 3, 8, 8)
    x[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(x)
    assert not model.actnorm_initialized()


def _z(batch=2, size=8):
    return [torch.randn(batch, *s) for s in fastglow.z_shapes(3, size, 2)]


@pytest.mark.parametrize("make,error,match", [
    (lambda: _z()[:1], ValueError, "n_block=2"),
    (lambda: _z() + _z()[:1], ValueError, "n_block=2"),
    (lambda: tuple(_z())[0], TypeError, "list of tensors"),
    (lambda: [_z()[0], _z(batch=3)[1]], ValueError, r"z_list\[0\] has shape"),
    (lambda: [_z(size=16)[0], _z()[1]], ValueError, r"z_list\[0\] has shape"),
    (lambda: [_z()[0][:, :5], _z()[1]], ValueError, r"z_list\[0\] has shape"),
    (lambda: [_z()[0], _z()[1][0]], ValueError, r"z_list\[1\] must have 4 dimensions"),
    (lambda: [_z()[0].long(), _z()[1]], TypeError, r"z_list\[0\] must have a floating dtype"),
    (lambda: [_z()[0].double(), _z()[1]], TypeError, r"z_list\[0\] is torch.float64"),
    (lambda: [_z()[0] * float("nan"), _z()[1]], ValueError, r"z_list\[0\] contains NaN"),
])
def test_reverse_rejects_bad_latents(model, make, error, match):
    with pytest.raises(error, match=match):
        model.reverse(make())


def test_reverse_accepts_good_latents(model):
    assert model.reverse(_z(), reconstruct=True).shape == (2, 3, 8, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "n must be"), (dict(n=2, temperature=-1.0), "temperature"),
    (dict(n=2, img_size=10), "multiples of 2\\*\\*n_block"),
])
def test_sample_rejects_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.sample(**kwargs)


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    model = fastglow.Glow(3, 1, 2, hidden_channels=8, backend="triton")  # built under the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="CUDA tensors"):
        model(x)  # from the first batch on, before ActNorm's init (issue 23, item 10; construction: test_api_edge_cases)
    assert not model.actnorm_initialized()


def test_dtype_mismatch_with_the_model_is_named(model):
    with pytest.raises(TypeError, match="model's parameters are torch.float32"):
        model(torch.zeros(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="model's parameters are torch.float32"):
        model.reverse([z.double() for z in _z()])

