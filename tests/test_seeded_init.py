"""Seed for seed, fastglow.Glow starts from rosinality's weights: its LU 1x1 convs draw from numpy's generator
(QR in float64, LU of the float32 rotation), every other parameter from torch's, in rosinality's order.

The first test restates those draws; the second compares with rosinality/glow-pytorch's own model.py when
``$ROSINALITY_MODEL`` names it (its code is not part of this repository)."""

import importlib.util
import os

import numpy as np
import pytest
import torch
from scipy import linalg

import fastglow
from fastglow import reference


def test_lu_convs_draw_numpys_generator_in_construction_order():
    torch.manual_seed(5)
    np.random.seed(5)
    model = fastglow.Glow(3, 3, 2, hidden_channels=8)
    after = np.random.get_state()
    convs = [m for m in model.modules() if isinstance(m, reference.InvConv2dLU)]
    assert len(convs) == 6
    np.random.seed(5)
    for conv in convs:
        c = conv.w_l.shape[0]
        q, _ = linalg.qr(np.random.randn(c, c))
        w_p, w_l, w_u = linalg.lu(q.astype(np.float32))
        assert np.array_equal(conv.w_p.numpy(), w_p) and np.array_equal(conv.w_l.detach().numpy(), w_l)
        assert np.array_equal(conv.w_u.detach().numpy(), np.triu(w_u, 1))
        assert np.array_equal(conv.s_sign.numpy(), np.sign(np.diag(w_u)))
        torch.testing.assert_close(conv.w_s.detach(), torch.log(torch.from_numpy(np.abs(np.diag(w_u)))),
                                   rtol=0, atol=0)
    replayed = np.random.get_state()  # nothing else in the constructor drew from numpy's generator
    assert np.array_equal(after[1], replayed[1]) and after[2:] == replayed[2:]


def test_torch_draws_do_not_depend_on_the_lu_convs():
    """The coupling networks' initial weights come from torch's generator alone (LU and plain 1x1 models)."""
    weights = []
    for conv_lu in (True, False):
        torch.manual_seed(7)
        np.random.seed(0 if conv_lu else 1)
        model = fastglow.Glow(3, 2, 2, hidden_channels=8, conv_lu=conv_lu)
        weights.append(model.blocks[0].flows[1].coupling.net[2].weight.detach().clone())
    # a plain 1x1 conv draws C x C from torch before each coupling, an LU one does not: the streams differ
    assert not torch.equal(*weights)


ROSINALITY = os.environ.get("ROSINALITY_MODEL")


@pytest.mark.skipif(not ROSINALITY, reason="set ROSINALITY_MODEL to rosinality/glow-pytorch's model.py")
@pytest.mark.parametrize("affine,conv_lu", [(True, True), (False, False)])
def test_same_seed_same_state_dict_as_rosinality(affine, conv_lu):
    spec = importlib.util.spec_from_file_location("rosinality_model", ROSINALITY)
    ros = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ros)
    states = []
    for build in (ros.Glow, fastglow.Glow):
        torch.manual_seed(3)
        np.random.seed(3)
        states.append(build(3, 4, 3, affine=affine, conv_lu=conv_lu).state_dict())
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():
        assert value.dtype == states[1][key].dtype and torch.equal(value, states[1][key]), key
