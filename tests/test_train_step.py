"""The training loop's parts on their own: the pure step (a batch -> loss, gradients, the numbers the guard
checks; nothing written, logged or updated) and the guard (skipped steps, rollback to the last good state,
singular 1x1 convolutions)."""

import copy

import pytest
import torch

import fastglow
from fastglow.app.guard import MAX_LOG_SCALE, Guard, lu_log_scale_max
from fastglow.app.objective import gradient_step, training_loss
from fastglow.testing import initialized_model

N_BINS = 17


def _model(reversible: bool = True, n_classes: int | None = None):
    """A small Glow after ActNorm's init, every parameter perturbed (no zero-initialised conv left), with an
    optimizer and a batch (x in [-1/2, 1/2), labels y for a class-conditional model)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=gen) - 0.5
    y = None if n_classes is None else torch.randint(n_classes, (6,), generator=gen)
    torch.manual_seed(0)
    model = fastglow.Glow(3, 2, 2, hidden_channels=8, backend="eager", reversible=reversible, n_classes=n_classes)
    initialized_model(model, x, sigma=0.05, y=y)
    return model, torch.optim.Adam(model.parameters(), lr=1.0), x, y


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("reversible, n_classes", [(True, None), (False, None), (False, 4)])
def test_the_step_measures_loss_and_gradients_and_changes_nothing_else(tmp_path, monkeypatch, capsys,
                                                                      reversible, n_classes):
    model, optimizer, x, y = _model(reversible, n_classes)
    twin = copy.deepcopy(model)
    weights, rng = _weights(model), torch.get_rng_state()
    monkeypatch.chdir(tmp_path)

    result = gradient_step(model, optimizer, x, y, lr=3e-4, n_bins=N_BINS, counts=(2,))

    assert list(tmp_path.iterdir()) == [] and capsys.readouterr() == ("", "")  # no file, no output
    assert torch.equal(torch.get_rng_state(), rng)  # no random numbers drawn
    torch.testing.assert_close(_weights(model), weights, rtol=0, atol=0)  # the update is the caller's
    assert not optimizer.state and [g["lr"] for g in optimizer.param_groups] == [3e-4]
    expected = training_loss(twin, x, N_BINS, y)
    expected.backward()
    assert result.finite and result.loss == pytest.approx(expected.item(), rel=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):  # the gradients are the loss's
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    clip_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf"))
    assert result.grad_norm > 0 and result.grad_norm == clip_norm.item()
    assert result.log_scale == lu_log_scale_max(model).item() > 0 and result.counts == (2.0,)


def test_a_non_finite_loss_is_reported_not_applied():
    model, optimizer, x, _ = _model()
    weights = _weights(model)
    result = gradient_step(model, optimizer, x, None, lr=1e-3, n_bins=N_BINS,
                        loss_fn=lambda *args: training_loss(*args) * float("nan"))
    assert not result.finite and result.loss != result.loss  # NaN
    torch.testing.assert_close(_weights(model), weights, rtol=0, atol=0)


def test_the_guard_counts_skipped_steps_and_stops_after_max_bad_steps_in_a_row():
    model, optimizer, _, _ = _model()
    guard = Guard(max_bad_steps=2, skipped=5)  # 5 skipped before a resume
    assert guard.accept(False, model, optimizer, {"step": 1}) is False
    assert (guard.skipped, guard.bad_run, guard.exhausted) == (6, 1, False)
    assert guard.accept(True, model, optimizer, {"step": 2}) is True
    assert (guard.skipped, guard.bad_run, guard.exhausted) == (6, 0, False)  # the run of bad steps ended
    for _ in range(2):
        guard.accept(False, model, optimizer, {"step": 3})
    assert (guard.skipped, guard.bad_run, guard.exhausted) == (8, 2, True)
    assert guard.last_good.step == 2  # skipped steps keep nothing


def test_the_guard_rolls_back_to_the_state_before_the_last_accepted_update():
    model, optimizer, x, _ = _model()
    guard, states = Guard(max_bad_steps=3), []
    for step in (1, 2, 3):  # Adam makes its moments at step 1: the capture's first and in-place paths both run
        result = gradient_step(model, optimizer, x, None, lr=1e-3, n_bins=N_BINS)
        states.append((_weights(model), copy.deepcopy(optimizer.state_dict())))
        # as the loop does: the state before step t's update is the run at step t - 1
        assert guard.accept(result.finite, model, optimizer, {"step": step - 1, "marker": step})
        optimizer.step()
    after = _weights(model)
    assert not torch.equal(after["blocks.0.flows.0.actnorm.loc"], states[-1][0]["blocks.0.flows.0.actnorm.loc"])

    assert guard.rollback(model, newer_than=2) is None  # a checkpoint at step 2 already holds that state
    torch.testing.assert_close(_weights(model), after, rtol=0, atol=0)
    good = guard.rollback(model, newer_than=1)
    assert good.step == 2 and good.extra["marker"] == 3
    torch.testing.assert_close(_weights(model), states[-1][0], rtol=0, atol=0)
    torch.testing.assert_close(good.tensors["model"], states[-1][0], rtol=0, atol=0)
    torch.testing.assert_close(good.tensors["optimizer"], states[-1][1], rtol=0, atol=0)


def test_the_guard_finds_singular_1x1_convolutions():
    model, optimizer, x, _ = _model(reversible=False)  # (the reversible backward would warn of its fallback)
    assert Guard.singular(lu_log_scale_max(model).item()) is None
    assert Guard.singular(MAX_LOG_SCALE - 1) is None
    assert "80" in Guard.singular(MAX_LOG_SCALE) and "nan" in Guard.singular(float("nan"))
    with torch.no_grad():
        model.blocks[0].flows[1].invconv.w_s[2] = -200.0  # exp(-200) underflows: W is singular in float32
    result = gradient_step(model, optimizer, x, None, lr=1e-3, n_bins=N_BINS)
    assert result.log_scale == 200.0 and Guard.singular(result.log_scale) == "|log scale| 200"
