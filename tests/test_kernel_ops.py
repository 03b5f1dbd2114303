"""Every kernel family's ``fastglow::`` op checked by ``torch.library.opcheck`` (schema, fake implementation
against the real kernel, autograd registration, AOT dispatch with dynamic shapes); under the Triton
interpreter on CPU. Small odd shapes, float64, random operands."""

import pytest
import torch

from fastglow import reference
from fastglow.kernels.channel_mix import channel_mix, channel_mix_grad, channel_mix_rebuild_grad
from fastglow.kernels.coupling import coupling, coupling_grad, coupling_mix_inverse, coupling_mix_op
from fastglow.kernels.lu_weight import lu_weight, lu_weight_grad, perm_from_matrix
from fastglow.kernels.squeeze import squeeze
from fastglow.testing import kernel_operands

F64 = dict(dtype=torch.float64)


def _randn(*shape, grad=False):
    return torch.randn(*shape, **F64).requires_grad_(grad)


def _lu_operands(c=5, steps=2, grad=True):
    convs = [reference.InvConv2dLU(c).double() for _ in range(steps)]
    perm = perm_from_matrix(torch.stack([m.w_p for m in convs]))
    params = [torch.stack([getattr(m, n) for m in convs]).detach().requires_grad_(grad) for n in ("w_l", "w_u", "w_s")]
    return perm, *params, torch.stack([m.s_sign for m in convs])


def _cases():
    torch.manual_seed(0)
    yield "squeeze", squeeze, (_randn(2, 3, 4, 6, grad=True), False)
    yield "unsqueeze", squeeze, (_randn(1, 8, 3, 2, grad=True), True)
    yield "lu_weight", lu_weight, _lu_operands()
    perm, w_l, w_u, w_s, s_sign = _lu_operands(grad=False)
    w_inv = lu_weight(perm, w_l, w_u, w_s, s_sign)[1]
    yield "lu_weight_backward", lu_weight_grad, (perm, w_l, w_u, w_s, s_sign, w_inv, _randn(2, 5, 5),
                                                 _randn(2, 5, 5), _randn(2))
    for affine in (True, False):
        t = kernel_operands((2, 6, 3, 5), torch.float64, affine, seed=int(affine))  # x, h_raw, zscale, mix, grad
        x, h_raw, zscale, mix, bias = (t[n].requires_grad_() for n in ("x", "h_raw", "zscale", "mix_weight",
                                                                      "mix_bias"))
        if affine:
            yield "channel_mix", channel_mix, (x, mix, bias, "ieee")
            yield "channel_mix_nobias", channel_mix, (x, mix, None, "ieee")
            yield "channel_mix_backward", channel_mix_grad, (x.detach(), mix.detach(), t["grad"], "ieee")
            yield "channel_mix_rebuild_backward", channel_mix_rebuild_grad, (
                x.detach(), t["grad"], mix.detach(), t["mix_weight_inv"], t["mix_bias_inv"], "ieee")
        yield f"coupling-{affine}", coupling, (x, h_raw, zscale, affine)
        yield f"coupling_mix-{affine}", coupling_mix_op, (x, h_raw, zscale, mix, bias, affine, True, "ieee")
        args = tuple(v.detach() for v in (x, h_raw, zscale))
        yield f"coupling_mix_inverse-{affine}", coupling_mix_inverse, (*args, t["mix_weight_inv"], t["mix_bias_inv"],
                                                                        affine, "ieee")
        yield f"coupling_backward-{affine}", coupling_grad, (args[0], t["grad"], *args[1:], t["grad_logdet"], affine)


CASES = list(_cases())


def _on(device, a):
    """A CPU-built operand on the test's device (a leaf again, keeping requires_grad)."""
    return a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a


@pytest.mark.parametrize("name,op,args", CASES, ids=[c[0] for c in CASES])
def test_opcheck(name, op, args, device):
    torch.library.opcheck(op, tuple(_on(device, a) for a in args))


def test_every_kernel_op_is_checked():
    """Every op the kernel files register is among the opchecked ones."""
    from fastglow.kernels import channel_mix as m1, coupling as m2, lu_weight as m3, squeeze as m4
    registered = {obj._qualname for mod in (m1, m2, m3, m4) for obj in vars(mod).values()
                  if type(obj).__name__ == "CustomOpDef"}
    assert len(registered) == 10 and all(name.startswith("fastglow::") for name in registered)
    assert registered == {op._qualname for _, op, _ in CASES}


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_opcheck_level_ops(backend):
    """The reversible level op and its backward, on a small initialised level (float64)."""
    from functools import partial

    import fastglow
    from fastglow.reversible import reversible_level, reversible_level_grad, step_slots
    from fastglow.testing import models_on_one_state
    _, (model,) = models_on_one_state([partial(fastglow.Glow, 3, 2, 2, hidden_channels=4, backend=backend)],
                                      (2, 3, 4, 4), sigma=0.2, dtype=torch.float64)
    flows = model.blocks[0].flows
    params = [t.detach().requires_grad_() for flow in flows for _, _, t in step_slots(flow)]
    x = _randn(2, 12, 2, 2, grad=True)
    args = (model._level_handles[0].key, backend, "ieee", 1e-6, None)
    torch.library.opcheck(reversible_level, (x, params, *args))
    y, _ = reversible_level(x.detach(), [p.detach() for p in params], *args)
    torch.library.opcheck(reversible_level_grad, (x.detach(), y, _randn(*y.shape), _randn(2),
                                                  [p.detach() for p in params], *args))
