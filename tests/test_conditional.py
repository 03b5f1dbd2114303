"""Class-conditional Glow (n_classes=N): the y-conditioned top prior against the Gaussian density written out by
hand, gradcheck through the prior and the class loss on both backends, sampling, classify, validation."""

import math
from functools import partial

import pytest
import torch

import fastglow
from fastglow import reference
from fastglow.testing import initialized_model, models_on_one_state, rel_error

pytestmark = pytest.mark.usefixtures("on_device")  # CUDA when there is one, else CPU (Triton: the interpreter)

N_CLASSES = 3
Y = torch.tensor([2, 0, 1])


@pytest.fixture(autouse=True)
def _labels_on_device(on_device, monkeypatch):
    """The labels every test shares, on the test's device."""
    monkeypatch.setitem(globals(), "Y", Y.to(on_device))


def _models(dtype=torch.float64, reversible=False, sigma=0.3):
    """(reference, {backend: fastglow.Glow}, x): conditional models on one perturbed state."""
    kw = dict(hidden_channels=8, n_classes=N_CLASSES)
    backends = ("eager", "triton")
    x, (ref, *fast) = models_on_one_state(
        [partial(reference.Glow, 2, 2, 2, **kw)] +
        [partial(fastglow.Glow, 2, 2, 2, backend=b, reversible=reversible, **kw) for b in backends],
        (3, 2, 8, 8), sigma=sigma, dtype=dtype, y=Y)
    return ref, dict(zip(backends, fast)), x


def test_module_tree_is_rosinalitys_plus_class_prior_and_classifier():
    plain = fastglow.Glow(2, 2, 3, hidden_channels=8)
    cond = fastglow.Glow(2, 2, 3, hidden_channels=8, n_classes=5)
    extra = set(cond.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(cond.state_dict())
    assert extra == {f"{m}.{p}" for m in ("class_prior", "classifier") for p in ("weight", "bias", "scale")}
    top = fastglow.z_shapes(2, 16, 3)[-1][0]  # channels of the top latent
    assert cond.class_prior.weight.shape == (2 * top, 5) and cond.classifier.weight.shape == (5, top)


def test_fresh_conditional_model_has_the_unconditional_density():
    """Zero-initialised class terms: same log p for every label as the unconditional model on the same weights."""
    torch.manual_seed(0)
    x = torch.rand(3, 2, 8, 8, dtype=torch.float64) - 0.5
    plain = initialized_model(fastglow.Glow(2, 2, 2, hidden_channels=8).double(), x, sigma=0.3)
    cond = fastglow.Glow(2, 2, 2, hidden_channels=8, n_classes=N_CLASSES).double()
    cond.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        expected = plain(x)
        for label in range(N_CLASSES):
            out = cond(x, torch.full((3,), label))
            torch.testing.assert_close(out[0], expected[0], rtol=1e-12, atol=0)
            torch.testing.assert_close(out[1], expected[1], rtol=1e-12, atol=0)
        torch.testing.assert_close(cond.classify(x), torch.zeros(3, N_CLASSES, dtype=torch.float64))


@pytest.mark.parametrize("which", ["reference", "eager", "triton"])
def test_log_p_is_the_gaussian_density_under_the_class_conditioned_prior(which):
    """log p(z | y) written out: every level's N(mean, e^log_sd) from its prior conv, and at the top the prior
    conv on zeros plus (W onehot(y) + b) * exp(3 scale) of class_prior."""
    ref, fast, x = _models()
    model = ref if which == "reference" else fast[which]
    conv_outputs = []
    hooks = [b.prior.register_forward_hook(lambda m, inp, out: conv_outputs.append(out)) for b in model.blocks]
    with torch.no_grad():
        log_p, _, z_outs = model(x, Y)
    for h in hooks:
        h.remove()
    cp = model.class_prior
    shift = (cp.weight.T[Y] + cp.bias) * torch.exp(3 * cp.scale)  # row y of W^T is W onehot(y)
    assert shift.abs().min() > 0 and len(set(Y.tolist())) == N_CLASSES  # every class term non-trivial
    expected = torch.zeros(3, dtype=torch.float64)
    for i, (z, out) in enumerate(zip(z_outs, conv_outputs)):
        if i == len(z_outs) - 1:
            out = out + shift[:, :, None, None]
        mean, log_sd = out.chunk(2, 1)
        expected += torch.distributions.Normal(mean, log_sd.exp()).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(log_p, expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # another label: the same latents, another density
        other = model(x, (Y + 1) % N_CLASSES)
    torch.testing.assert_close(other[2][-1], z_outs[-1], rtol=0, atol=0)
    assert (other[0] - log_p).abs().min() > 1e-3


@pytest.mark.parametrize("reversible", [False, True])
def test_backends_agree_on_conditional_outputs_gradients_and_samples(reversible):
    ref, fast, x = _models(reversible=reversible)
    results = {}
    for name, model in (("reference", ref), *fast.items()):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        log_p, logdet, z_outs = model(xi, Y)
        loss = fastglow.bits_per_dim(log_p, logdet, x.shape, 32) + model.class_loss(z_outs, Y)
        loss.backward()
        with torch.no_grad():
            sample = model.reverse([0.7 * torch.ones_like(z) for z in z_outs], y=Y)
        results[name] = dict(log_p=log_p, logits=model.class_logits(z_outs), grad_x=xi.grad, sample=sample,
                             **{n: p.grad for n, p in model.named_parameters()})
    for backend in fast:
        for key, expected in results["reference"].items():
            assert rel_error(results[backend][key], expected) <= 1e-9, (backend, key)


class _Objective(torch.nn.Module):
    """(log_p, logdet, class loss) of a conditional Glow, for gradcheck (separate outputs: the small class loss
    is compared on its own, not drowned in the density's larger derivatives)."""

    def __init__(self, glow):
        super().__init__()
        self.glow = glow

    def forward(self, x, y):
        log_p, logdet, z_outs = self.glow(x, y)
        return log_p, logdet, self.glow.class_loss(z_outs, y)


@pytest.mark.parametrize("backend,reversible", [("eager", False), ("eager", True), ("triton", False),
                                                ("triton", True)])
def test_gradcheck_through_class_conditioned_prior_and_class_loss(backend, reversible):
    """Every class-conditional parameter and the top level's flow (the class loss reaches it through z_top).
    Eager plain autograd: the full Jacobian; the others in gradcheck's fast mode (a random projection of
    the Jacobian, so the interpreter's Triton runs stay short)."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) - 0.5
    y = torch.tensor([1, 2])
    model = fastglow.Glow(1, 1, 2, hidden_channels=4, n_classes=N_CLASSES, class_weight=0.5, backend=backend,
                          reversible=reversible).double()
    initialized_model(model, x, sigma=0.2, y=y)
    names = ["class_prior.weight", "class_prior.scale", "classifier.weight", "classifier.bias",
             "classifier.scale", "blocks.1.flows.0.actnorm.loc"]
    state = dict(model.named_parameters())
    params = [state[n].detach().clone().requires_grad_() for n in names]
    objective = _Objective(model)

    def terms(x, *params):
        return torch.func.functional_call(objective, {f"glow.{n}": p for n, p in zip(names, params)}, (x, y))

    fast_mode = (backend, reversible) != ("eager", False)
    inputs = (x.clone().requires_grad_(), *params)
    assert torch.autograd.gradcheck(terms, inputs, eps=1e-6, atol=1e-6, fast_mode=fast_mode)


def test_samples_at_temperature_zero_sit_at_their_class_mean():
    """T=0: the top latent is the class-conditioned prior mean, so re-encoding a sample gives that mean back."""
    _, fast, _ = _models()
    model = fast["eager"]
    labels = torch.arange(N_CLASSES)
    with torch.no_grad():
        imgs = model.sample(N_CLASSES, temperature=0.0, img_size=8, y=labels)
        _, _, z_outs = model(imgs, labels)
        top_conv = model.blocks[-1].prior(torch.zeros_like(z_outs[-1]))
        shift = fastglow.conditional.class_prior_shift(model.class_prior, labels)
        mean = (top_conv + shift[:, :, None, None]).chunk(2, 1)[0]
    torch.testing.assert_close(z_outs[-1], mean, rtol=1e-9, atol=1e-9)
    assert (imgs[0] - imgs[1]).abs().max() > 1e-3  # another class, another image
    one_class = model.sample(2, temperature=0.0, img_size=8, y=1)  # an int: that class for all n
    torch.testing.assert_close(one_class[0], imgs[1])


def test_classify_is_the_classifier_on_the_mean_pooled_top_latent():
    _, fast, x = _models()
    model = fast["triton"]
    with torch.no_grad():
        logits = model.classify(x)
        z_top = model(x, Y)[2][-1]
    c = model.classifier
    expected = (z_top.mean((2, 3)) @ c.weight.T + c.bias) * torch.exp(3 * c.scale)
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
    ce_bits = -torch.log_softmax(expected, 1)[torch.arange(3), Y] / math.log(2)
    torch.testing.assert_close(model.class_loss(model(x, Y)[2], Y), model.class_weight * ce_bits.mean())


def test_conditional_state_dict_loads_into_the_reference_and_from_data_parallel():
    ref, fast, x = _models()
    state = {"module." + k: v for k, v in fast["eager"].state_dict().items()}
    loaded = reference.Glow(2, 2, 2, hidden_channels=8, n_classes=N_CLASSES).double()
    loaded.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, Y)[0], ref(x, Y)[0])
    with pytest.raises(RuntimeError, match="Unexpected key"):
        reference.Glow(2, 2, 2, hidden_channels=8).double().load_state_dict(fast["eager"].state_dict())


def _bad(model, x, call):
    z = [torch.zeros(3, *s, dtype=x.dtype) for s in fastglow.z_shapes(2, 8, 2)]
    return {"forward": lambda y: model(x, y), "reverse": lambda y: model.reverse(z, y=y),
            "sample": lambda y: model.sample(3, img_size=8, y=y),
            "class_loss": lambda y: model.class_loss(z, y)}[call]


@pytest.mark.parametrize("call", ["forward", "reverse", "sample", "class_loss"])
@pytest.mark.parametrize("bad_y,error,match", [
    (lambda y: None, ValueError, "required"), (lambda y: y.int(), TypeError, "int64"),
    (lambda y: y.double(), TypeError, "int64"), (lambda y: [2, 0, 1], TypeError, "torch.Tensor"),
    (lambda y: y[:2], ValueError, r"shape \(3,\)"), (lambda y: y.view(3, 1), ValueError, r"shape \(3,\)"),
    (lambda y: y - 1, ValueError, r"outside \[0, 3\)"), (lambda y: y + 1, ValueError, r"outside \[0, 3\)")])
def test_bad_labels_are_refused_with_one_line(call, bad_y, error, match):
    model = fastglow.Glow(2, 1, 2, hidden_channels=4, n_classes=N_CLASSES)
    with pytest.raises(error, match=match) as info:
        _bad(model, torch.rand(3, 2, 8, 8) - 0.5, call)(bad_y(Y))
    assert "\n" not in str(info.value)


def test_labels_for_an_unconditional_model_and_bad_constructor_arguments():
    model = fastglow.Glow(2, 1, 2, hidden_channels=4)
    x = torch.rand(3, 2, 8, 8) - 0.5
    for call in ("forward", "reverse", "sample"):
        with pytest.raises(ValueError, match="unconditional"):
            _bad(model, x, call)(Y)
    with pytest.raises(ValueError, match="no classifier"):
        model.classify(x)
    with pytest.raises(ValueError, match="unconditional"):
        model.class_loss(model(x)[2], Y)
    cond = fastglow.Glow(2, 1, 2, hidden_channels=4, n_classes=N_CLASSES)
    z = [torch.randn(3, *s) for s in fastglow.z_shapes(2, 8, 2)]
    assert cond.reverse(z, reconstruct=True).shape == (3, 2, 8, 8)  # reconstructing needs no labels
    for kwargs, error in [(dict(n_classes=1), ValueError), (dict(n_classes=2.0), TypeError),
                          (dict(n_classes=True), TypeError), (dict(n_classes=3, class_weight=-0.1), ValueError),
                          (dict(n_classes=3, class_weight=float("nan")), ValueError),
                          (dict(n_classes=3, class_weight="0.1"), TypeError)]:
        with pytest.raises(error):
            fastglow.Glow(2, 1, 2, **kwargs)
