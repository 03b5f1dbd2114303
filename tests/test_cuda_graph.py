"""fastglow.CudaGraphStep: on a CPU the step runs eagerly on its static buffers, so all but the capture itself
is tested here (the same step, no host syncs, the warm-up undone); with CUDA the capture is tested too."""

import numpy as np
import pytest
import torch

import fastglow
from fastglow.testing import HostSyncDetector, initialized_model, training_step


def _model(seed=0, device="cpu", **kwargs):
    torch.manual_seed(seed)
    np.random.seed(seed)  # the LU 1x1 convs draw from numpy's generator (as rosinality's do)
    x = torch.rand(2, 3, 8, 8, device=device) - 0.5
    kwargs = dict(dict(validate=False, reversible_tol=None), **kwargs)
    model = fastglow.Glow(3, 2, 2, hidden_channels=8, **kwargs).to(device)
    return initialized_model(model, x), x


def _manual_step(model, optimizer, x):
    """A plain training step: zero_grad, bits/dim, backward, optimizer.step() (as the benchmarks take it)."""
    return training_step(model, model, x, optimizer)


def test_step_matches_a_plain_training_step_and_syncs_nothing():
    model, x = _model()
    twin, _ = _model()
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9) for m in (model, twin))
    step = fastglow.CudaGraphStep(model, opt, x)
    for i in range(3):
        batch = x.flip(0) if i % 2 else x
        with HostSyncDetector() as detector:
            loss = step(batch)
        assert detector.syncs == []
        torch.testing.assert_close(loss, _manual_step(twin, twin_opt, batch), rtol=0, atol=0)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_warm_up_is_undone():
    model, x = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _manual_step(model, opt, x)  # an optimizer with state already
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    fastglow.CudaGraphStep(model, opt, x, warmup=2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(v, state[k]) for k, v in opt.state[next(model.parameters())].items())

    fresh_model, _ = _model()
    fresh = torch.optim.Adam(fresh_model.parameters(), lr=1e-2)
    fastglow.CudaGraphStep(fresh_model, fresh, x, warmup=1)
    assert all(float(v.abs().sum()) == 0 for s in fresh.state.values() for v in s.values())  # as if never used


def test_without_optimizer_only_the_gradients_are_computed():
    model, x = _model()
    before = [p.detach().clone() for p in model.parameters()]
    step = fastglow.CudaGraphStep(model, None, x)
    step(x)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_use_is_refused():
    model, x = _model()
    with pytest.raises(ValueError, match="ActNorm"):
        fastglow.CudaGraphStep(fastglow.Glow(3, 2, 2, hidden_channels=8), None, x)
    for syncing in (dict(validate=True), dict(reversible_tol="auto")):  # the NaN check, the reconstruction check
        other, _ = _model(**syncing)
        with pytest.raises(ValueError, match="syncs with the host"):
            fastglow.CudaGraphStep(other, None, x)
    step = fastglow.CudaGraphStep(model, None, x)
    with pytest.raises(ValueError, match="built for"):
        step(x[:1])
    with pytest.raises(ValueError, match="CUDA"):
        fastglow.CudaGraphStep(model, None, x, capture=True)
    with pytest.raises(ValueError, match="warmup"):
        fastglow.CudaGraphStep(model, None, x, warmup=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_captured_step_matches_eager_on_cuda():
    model, x = _model(device="cuda")
    twin, _ = _model(device="cuda")
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3, capturable=True) for m in (model, twin)]
    step = fastglow.CudaGraphStep(model, opts[0], x)
    assert step.graph is not None
    with pytest.raises(ValueError, match="capturable"):
        fastglow.CudaGraphStep(twin, torch.optim.Adam(twin.parameters()), x)
    for _ in range(2):
        torch.testing.assert_close(step(x), _manual_step(twin, opts[1], x), rtol=1e-5, atol=1e-5)


def test_train_cuda_graph_flag_gives_the_same_run(tmp_path, capsys):
    """``fastglow train --cuda-graph`` (eager on a CPU, the same static-buffer step) trains exactly like the
    plain loop; the lr schedule and the optimizer step run outside the graph."""
    from fastglow.app.cli import main
    flags = ["train", "--n-flow", "2", "--n-block", "2", "--hidden", "8", "--batch", "16", "--warmup", "2",
             "--steps", "3", "--no-progress", "--eval-every", "0", "--device", "cpu"]
    for name, extra in (("plain", []), ("graph", ["--cuda-graph"])):
        assert main([*flags, "--out", str(tmp_path / name), *extra]) == 0
    assert "no CUDA device, each step runs eagerly" in capsys.readouterr().err
    states = [torch.load(next((tmp_path / n / "checkpoints").glob("*.pt")), weights_only=False)["model"]
              for n in ("plain", "graph")]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_gradients_stay_attached_after_zero_grad_between_replays(device):
    """A replayed step sets .grad again, so zero_grad(set_to_none=True) between steps loses nothing (with CUDA
    the step is captured: the replay does not run the Python that assigns .grad)."""
    model, x = _model(device=device)
    step = fastglow.CudaGraphStep(model, None, x)
    step(x)
    model.zero_grad(set_to_none=True)
    step(x)
    assert all(p.grad is not None for p in model.parameters())
