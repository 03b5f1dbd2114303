"""Execution options for GPUs: the coupling networks under bf16 autocast with the flow maths in float32, models
cast to bf16/fp16, channels_last coupling networks, and a training step with no host syncs (``validate=False``).
On a CPU (Triton through the interpreter) what a CPU can show; with CUDA the same tests run natively."""

import pytest
import torch

import fastglow
from fastglow import reference
from fastglow.testing import HostSyncDetector, initialized_model, models_on_one_state, rel_error

BACKENDS = ["eager", "triton"]


def _bpd(model, x):
    log_p, logdet, z = model(x)
    return fastglow.bits_per_dim(log_p, logdet, x.shape, 256), z


def _record_dtypes(model):
    """Output dtypes of the coupling networks' convs, the 1x1 convs and the priors, by forward hooks."""
    seen = {"net": set(), "invconv": set(), "prior": set()}
    for block in model.blocks:
        block.prior.register_forward_hook(lambda m, i, out: seen["prior"].add(out.dtype))
        for flow in block.flows:
            flow.coupling.net[0].register_forward_hook(lambda m, i, out: seen["net"].add(out.dtype))
            flow.invconv.register_forward_hook(lambda m, i, out: seen["invconv"].add(out[0].dtype))
    return seen


def _pair(backend, device, affine=True, sigma=0.03, **options):
    make = lambda **kw: lambda: fastglow.Glow(3, 3, 2, affine=affine, hidden_channels=16,  # noqa: E731
                                               backend=backend, **kw)
    x, (plain, fast) = models_on_one_state([make(), make(**options)], (2, 3, 8, 8), sigma=sigma,
                                           dtype=torch.float32)
    return x.to(device), plain.to(device), fast.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
def test_bf16_autocast_networks_keep_loss_and_inversion(backend, affine, device):
    x, plain, fast = _pair(backend, device, affine, autocast_dtype=torch.bfloat16)
    seen = _record_dtypes(fast)
    with torch.no_grad():
        bpd32, z32 = _bpd(plain, x)
        bpd16, z = _bpd(fast, x)
        x_rec = fast.reverse(z, reconstruct=True)
    assert seen["net"] == {torch.bfloat16} and not torch.equal(z[0], z32[0])  # bf16 did change the latents
    assert abs(bpd16 - bpd32) <= 1e-2
    assert x_rec.dtype == torch.float32 and rel_error(x_rec, x) <= 1e-5


def test_bf16_autocast_runs_only_the_networks_in_bf16_even_inside_a_callers_autocast(device):
    x, _, fast = _pair("eager", device, autocast_dtype=torch.bfloat16)
    seen = _record_dtypes(fast)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        log_p, logdet, z = fast(x)
        fast.reverse(z, reconstruct=True)
    assert seen == {"net": {torch.bfloat16}, "invconv": {torch.float32}, "prior": {torch.float32}}
    assert log_p.dtype == logdet.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_actnorm_init_and_a_differentiable_reverse_run_the_networks_under_the_options(backend, device):
    """The two paths outside a level's forward that run coupling networks: the ActNorm init pass of a fresh
    model and, on the Triton backend, the eager inverse taken while autograd records (latents requiring grad)."""
    fast = fastglow.Glow(3, 3, 2, hidden_channels=16, backend=backend, autocast_dtype=torch.bfloat16).to(device)
    seen = _record_dtypes(fast)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(device) - 0.5
    _, _, z = fast(x)  # first batch: the init pass, then the level's forward
    assert fast.actnorm_initialized() and seen["net"] == {torch.bfloat16}
    seen["net"].clear()
    fast.reverse([t.detach().requires_grad_() for t in z], reconstruct=True).sum().backward()
    assert seen["net"] == {torch.bfloat16}


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_reversible_gradients_match_plain_autograd(backend, device):
    """The reversible backward re-runs each network under the same autocast: the same bf16 values."""
    x, _, rev = _pair(backend, device, autocast_dtype=torch.bfloat16)
    plain = fastglow.Glow(3, 3, 2, hidden_channels=16, backend=backend, reversible=False,
                          autocast_dtype=torch.bfloat16).to(device)
    plain.load_state_dict(rev.state_dict())
    grads = []
    for model in (rev, plain):
        _bpd(model, x)[0].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[1].items():
        assert rel_error(grads[0][name], g) <= 1e-3, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("conv_lu", [True, False])
@pytest.mark.parametrize("cls", [reference.Glow, fastglow.Glow])
def test_models_cast_to_low_precision_reverse_and_sample(cls, conv_lu, dtype, device):
    torch.manual_seed(0)
    x = torch.rand(3, 3, 8, 8) - 0.5
    model = initialized_model(cls(3, 2, 2, conv_lu=conv_lu, hidden_channels=16), x, sigma=0.01).to(device, dtype)
    x = x.to(device)
    with torch.no_grad():
        _, _, z = model(x.to(dtype))
        x_rec = model.reverse(z, reconstruct=True)
        samples = model.reverse([0.7 * torch.randn_like(t) for t in z])
    assert x_rec.dtype == dtype and rel_error(x_rec.float(), x) <= 2e-2  # bf16 keeps 8 bits
    assert samples.shape == x.shape and torch.isfinite(samples).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_networks_give_the_same_outputs_and_gradients(backend, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the two layouts' TF32 kernels round apart
    x, plain, fast = _pair(backend, device, channels_last=True)
    inputs_cl = []
    fast.blocks[0].flows[0].coupling.net[0].register_forward_hook(
        lambda m, i, out: inputs_cl.append(i[0].is_contiguous(memory_format=torch.channels_last)))
    outs = []
    for model in (plain, fast):
        bpd, z = _bpd(model, x)
        bpd.backward()
        with torch.no_grad():
            outs.append((bpd.detach(), model.reverse(z, reconstruct=True),
                         {n: p.grad for n, p in model.named_parameters()}))
    assert inputs_cl and all(inputs_cl)
    weight = fast.blocks[0].flows[0].coupling.net[0].weight  # a 3x3 conv: the two layouts differ
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert rel_error(outs[1][0], outs[0][0]) <= 1e-6 and rel_error(outs[1][1], outs[0][1]) <= 1e-5
    for name, g in outs[0][2].items():
        assert rel_error(outs[1][2][name], g) <= 1e-4, name
    assert list(fast.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reversible", [True, False])
def test_training_step_without_validation_has_no_host_sync(backend, reversible, device):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8, device=device) - 0.5
    model = initialized_model(fastglow.Glow(3, 2, 2, hidden_channels=8, backend=backend, reversible=reversible,
                                            validate=False, reversible_tol=None).to(device), x)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    with HostSyncDetector() as detector:
        _bpd(model, x)[0].backward()
        optimizer.step()
    assert detector.syncs == []
    model.validate = True
    with HostSyncDetector() as detector:
        model(x)
    assert detector.syncs == ["_local_scalar_dense"]  # the NaN check reads one value: the detector sees it


def test_validate_false_skips_only_the_value_check():
    model = fastglow.Glow(3, 1, 1, hidden_channels=4, validate=False)
    bad = torch.full((1, 3, 4, 4), float("nan"))
    assert torch.isnan(model(bad)[0]).all()
    with pytest.raises(ValueError, match="NaN"):
        fastglow.Glow(3, 1, 1, hidden_channels=4)(bad)
    with pytest.raises(ValueError, match="channels"):
        model(torch.zeros(1, 2, 4, 4))


@pytest.mark.parametrize("kwargs,error", [
    (dict(autocast_dtype=torch.float32), ValueError), (dict(autocast_dtype="bf16"), ValueError),
    (dict(channels_last=1), TypeError), (dict(validate=None), TypeError)])
def test_bad_execution_options_are_refused(kwargs, error):
    with pytest.raises(error):
        fastglow.Glow(3, 1, 1, hidden_channels=4, **kwargs)


@pytest.mark.parametrize("options", [dict(), dict(channels_last=True), dict(autocast_dtype=torch.bfloat16)])
def test_network_options_run_the_reference_network(options):
    """The backends' NetOptions run the reference coupling network unchanged (the reference module itself has no
    execution options): coupling_h equals coupling.net, and h_raw * exp(3 zscale) equals it too, at non-trivial
    weights; under bf16 autocast, within bf16's rounding and cast back to the input's dtype."""
    from fastglow.backends import NetOptions
    from fastglow.testing import perturb_
    coupling = perturb_(reference.AffineCoupling(6, 16), sigma=0.2, seed=3)
    x_a = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    net = NetOptions(**options)
    expected = coupling.net(x_a)
    h, (h_raw, zscale) = net.coupling_h(coupling, x_a), net.coupling_h_raw(coupling, x_a)
    assert h.dtype == h_raw.dtype == x_a.dtype and expected.abs().max() > 0.1
    tol = 2e-2 if "autocast_dtype" in options else 1e-6
    assert rel_error(h, expected) <= tol
    assert rel_error(h_raw * torch.exp(3 * zscale).view(1, -1, 1, 1), expected) <= tol
    assert not hasattr(coupling, "run_net") and not hasattr(coupling.net[4], "raw")
