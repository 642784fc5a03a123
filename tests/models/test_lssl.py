"""LSSL: HiPPO matrices against their formulas, the Krylov kernel against the recurrence (float64), GBT / ZOH
discretisations against their closed forms, carried state == one pass, and the trainable / fixed parameters."""

import math

import pytest
import torch

from memzoo.models.layers.lssl import LSSL, krylov
from memzoo.models.layers.ssm_init import hippo
from memzoo.testing import assert_close
from memzoo.train.loop import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def layer(**kw):
    torch.manual_seed(0)
    return LSSL(**{"d_model": 4, "d_state": 16, **kw}).double()


def recurrence(m, u, x0=None):
    """x_t = dA x_{t-1} + dB u_t, y_t = C x_t + D u_t, one token at a time."""
    da, db = m.discretize(torch.float64)
    x = torch.zeros(u.shape[0], *db.shape, dtype=torch.float64) if x0 is None else x0
    ys = []
    for t in range(u.shape[1]):
        x = torch.einsum("hnk,bhk->bhn", da, x) + db * u[:, t, :, None]
        ys.append((m.C * x).sum(-1) + m.D * u[:, t])
    return torch.stack(ys, 1), x


def test_hippo_legs_and_legt_match_their_formulas():
    a, b = hippo("legs", 6)
    for n in range(6):
        for k in range(6):
            want = -((2 * n + 1) * (2 * k + 1)) ** 0.5 if n > k else (-(n + 1) if n == k else 0.0)
            assert abs(a[n, k] - want) < 1e-12
    assert torch.allclose(b, torch.arange(6).double().mul(2).add(1).sqrt())
    assert torch.allclose(torch.linalg.eigvals(a).real.sort().values, -torch.arange(6, 0, -1).double())
    a_t, _ = hippo("legt", 16)
    assert torch.linalg.eigvals(a_t).real.max() < 0, "LegT must be stable"
    with pytest.raises(ValueError, match="measure"):
        hippo("fout", 4)


def test_krylov_columns_are_matrix_powers():
    a = torch.randn(2, 5, 5, dtype=torch.float64) / 3
    v = torch.randn(3, 2, 5, dtype=torch.float64)
    cols = krylov(a, v, 11)
    for length in range(11):
        want = torch.einsum("hnk,bhk->bhn", torch.linalg.matrix_power(a, length), v)
        assert_close(cols[..., length], want, 1e-12, f"column {length}")


@pytest.mark.parametrize("disc", ["bilinear", "zoh"])
@pytest.mark.parametrize("measure", ["legs", "legt"])
def test_krylov_kernel_equals_recurrence(measure, disc):
    m = layer(measure=measure, disc=disc)
    u = torch.randn(2, 300, 4, dtype=torch.float64)
    x0 = torch.randn(2, 4, 16, dtype=torch.float64)
    for state in (None, x0):
        with torch.no_grad():
            y, x = m.ssm(u, state)
            y_ref, x_ref = recurrence(m, u, state)
        assert_close(y, y_ref, 1e-10, f"output from state {state is not None}")
        assert_close(x, x_ref, 1e-10, f"final state from state {state is not None}")


def test_discretisations_match_closed_forms():
    a, b = hippo("legs", 32)
    eye = torch.eye(32, dtype=torch.float64)
    m = layer(d_state=32, d_model=1)
    with torch.no_grad():
        m.log_dt.fill_(math.log(0.01))
    da, db = m.discretize(torch.float64)
    # The layer stores A, B in fp32 (then cast): compare against the matrices it holds.
    assert_close(m.A, a, 1e-7, "stored A")
    a, b = m.A, m.B
    inv = torch.linalg.inv(eye - 0.005 * a)
    assert_close(da[0], inv @ (eye + 0.005 * a), 1e-12, "bilinear dA")
    assert_close(db[0], 0.01 * inv @ b, 1e-12, "bilinear dB")
    # The spec's stability figure: LegS N=32, dt=0.01 under the bilinear transform has spectral radius 0.990.
    assert abs(torch.linalg.eigvals(da[0]).abs().max().item() - 0.990) < 5e-4
    m = LSSL(d_model=1, d_state=32, disc="zoh").double()
    with torch.no_grad():
        m.log_dt.fill_(math.log(0.01))
    a, b = m.A, m.B
    da, db = m.discretize(torch.float64)
    assert_close(da[0], torch.linalg.matrix_exp(0.01 * a), 1e-12, "zoh dA")
    assert_close(a @ db[0], (da[0] - eye) @ b, 1e-10, "zoh dB")


def test_many_carried_segments_equal_one_pass():
    m = layer(measure="legt")
    x = torch.randn(1, 400, 4, dtype=torch.float64)
    y_full, s_full = m(x)
    cuts = [0, 1, 2, 50, 51, 177, 300, 399, 400]
    ys, state = [], None
    for a, b in zip(cuts[:-1], cuts[1:]):
        y, state = m(x[:, a:b], state)
        ys.append(y)
    assert_close(torch.cat(ys, 1), y_full, 1e-10, "segments")
    assert_close(state.x, s_full.x, 1e-10, "segments state")


def test_fixed_and_trainable_transition():
    fixed = LSSL(d_model=4, d_state=8, learn_dt=False)
    names = {n for n, _ in fixed.named_parameters()}
    assert "A" not in names and "B" not in names and {"A", "B"} <= {n for n, _ in fixed.named_buffers()}
    assert not fixed.log_dt.requires_grad
    learn = LSSL(d_model=4, d_state=8, learn_a=True, ssm_lr_scale=0.5)
    groups = param_groups(learn, weight_decay=0.1, lr=1.0)
    ssm_group = next(g for g in groups if any(p is learn.A for p in g["params"]))
    assert ssm_group["lr"] == 0.5 and ssm_group["weight_decay"] == 0.0
    assert {id(p) for p in ssm_group["params"]} == {id(learn.A), id(learn.B), id(learn.log_dt)}
    x = torch.randn(2, 20, 4)
    learn(x)[0].square().sum().backward()
    assert learn.A.grad is not None and torch.isfinite(learn.A.grad).all() and learn.A.grad.abs().sum() > 0


def test_bad_config_raises():
    with pytest.raises(ValueError, match="measure"):
        LSSL(d_model=4, measure="fout")
    with pytest.raises(ValueError, match="disc"):
        LSSL(d_model=4, disc="euler")
