"""Tests of the GrBAL-style MAML dynamics adaptation: the functional core
(learning/maml_core.py), the models (learning/dynamics_models.py, learning/torque_model.py),
the online adapter and the action correction."""

from __future__ import annotations

import copy
import io
import logging
import threading
import time
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from metarl_ros.learning.action_correction import correct_action
from metarl_ros.learning.dynamics_config import MAMLConfig
from metarl_ros.learning.dynamics_models import DynamicsModel, load_checkpoint, make_checkpoint
from metarl_ros.learning.maml_core import (
    MAMLTrainer,
    adapted_names,
    dynamics_loss,
    inner_adapt,
    maml_loss,
    params_of,
)
from metarl_ros.learning.online_adapter import OnlineAdapter, ParamsSnapshot
from metarl_ros.learning.torque_model import PDStructure, TorqueGainDynamics, head_at
from metarl_ros.learning.transitions import TransitionBatch
from metarl_ros.policy.dynamics_adaptation import (
    LAG_HORIZON_TICKS,
    STRUCTURED_DEFAULTS,
    DynamicsAdaptation,
)
from dynamics_helpers import toy_torque_model

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def quadratic_loss(
    module: nn.Module, params: Mapping[str, Tensor], batch: tuple[Tensor, Tensor]
) -> Tensor:
    """0.5 * ||X W^T - Y||_F^2 for a bias-free nn.Linear."""
    x, y = batch
    pred = functional_call(module, dict(params), (x,))
    return 0.5 * torch.sum((pred - y) ** 2)


def linear_window(
    n: int, gain: float, offset: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float64
) -> TransitionBatch:
    """1-D system: delta = gain * action + offset (obs is irrelevant)."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, 1, generator=g, dtype=dtype)
    action = torch.rand(n, 1, generator=g, dtype=dtype) * 2 - 1
    return TransitionBatch(obs=obs, action=action, next_obs=obs + gain * action + offset)


def zero_linear_model(dtype: torch.dtype = torch.float64) -> DynamicsModel:
    """Affine 1-D model (hidden_sizes=()) predicting 0 everywhere."""
    model = DynamicsModel(1, 1, 1, 0, hidden_sizes=()).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def clone_params(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in params.items()}


def params_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------
# functional MAML core on a quadratic (closed form)
# ------------------------------------------------------------------------------------------


@pytest.fixture()
def quadratic() -> dict[str, Tensor | float | nn.Linear]:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, 3, generator=g, dtype=torch.float64))
    xs = torch.randn(5, 3, generator=g, dtype=torch.float64)
    ys = torch.randn(5, 2, generator=g, dtype=torch.float64)
    xq = torch.randn(4, 3, generator=g, dtype=torch.float64)
    yq = torch.randn(4, 2, generator=g, dtype=torch.float64)
    return {"lin": lin, "xs": xs, "ys": ys, "xq": xq, "yq": yq, "lr": 0.07}


def test_inner_step_matches_analytic_sgd(quadratic: dict) -> None:
    lin, xs, ys, lr = quadratic["lin"], quadratic["xs"], quadratic["ys"], quadratic["lr"]
    w = lin.weight.detach().clone()
    a_s, b_s = xs.T @ xs, ys.T @ xs  # grad L_s(W) = W A_s - B_s
    w1 = w - lr * (w @ a_s - b_s)
    w2 = w1 - lr * (w1 @ a_s - b_s)

    start = dict(lin.named_parameters())
    one = inner_adapt(lin, start, (xs, ys), steps=1, lr=lr, loss_fn=quadratic_loss)
    two = inner_adapt(lin, start, (xs, ys), steps=2, lr=lr, loss_fn=quadratic_loss)
    torch.testing.assert_close(one["weight"], w1, rtol=0, atol=1e-12)
    torch.testing.assert_close(two["weight"], w2, rtol=0, atol=1e-12)
    assert torch.equal(lin.weight.detach(), w), "inner_adapt must not modify the start params"


def test_meta_gradient_second_and_first_order(quadratic: dict) -> None:
    lin, xs, ys, xq, yq, lr = (quadratic[k] for k in ("lin", "xs", "ys", "xq", "yq", "lr"))
    w = lin.weight.detach().clone()
    a_s, b_s = xs.T @ xs, ys.T @ xs
    a_q, b_q = xq.T @ xq, yq.T @ xq
    w_adapted = w - lr * (w @ a_s - b_s)
    grad_q = w_adapted @ a_q - b_q  # grad L_q at W'
    # d/dW L_q(W - lr grad L_s(W)) = (I - lr H_s) grad L_q(W'); H_s[V] = V A_s.
    expected_second = grad_q - lr * grad_q @ a_s

    def meta_grad(first_order: bool) -> Tensor:
        lin.zero_grad(set_to_none=True)
        loss = maml_loss(
            lin,
            [(xs, ys)],
            [(xq, yq)],
            inner_steps=1,
            inner_lr=lr,
            first_order=first_order,
            loss_fn=quadratic_loss,
        )
        loss.backward()
        return lin.weight.grad.detach().clone()

    g_second = meta_grad(first_order=False)
    g_first = meta_grad(first_order=True)
    torch.testing.assert_close(g_second, expected_second, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_first, grad_q, rtol=1e-5, atol=1e-5)
    hessian_term = lr * grad_q @ a_s
    assert hessian_term.norm() > 0.1  # the comparison below is not vacuous
    torch.testing.assert_close(g_first - g_second, hessian_term, rtol=1e-5, atol=1e-5)


def test_bounded_step_has_exactly_the_bound_norm() -> None:
    torch.manual_seed(1)
    model = DynamicsModel(3, 2, 2, 0, hidden_sizes=(8,)).double()
    g = torch.Generator().manual_seed(2)
    obs = torch.randn(16, 3, generator=g, dtype=torch.float64)
    batch = TransitionBatch(
        obs=obs,
        action=torch.randn(16, 2, generator=g, dtype=torch.float64),
        next_obs=obs + 3 * torch.randn(16, 3, generator=g, dtype=torch.float64),
    )
    bound, lr = 1e-3, 0.5
    current = params_of(model)
    for _ in range(3):
        nxt = inner_adapt(model, current, batch, steps=1, lr=lr, max_step_norm=bound)
        diff = {k: nxt[k].detach() - current[k] for k in current}
        norm = torch.sqrt(sum(torch.sum(d * d) for d in diff.values()))
        assert float(norm) == pytest.approx(bound, rel=1e-9)
        # direction is still the negative gradient
        p = {k: v.detach().clone().requires_grad_(True) for k, v in current.items()}
        grads = torch.autograd.grad(dynamics_loss(model, p, batch), list(p.values()))
        flat_d = torch.cat([diff[k].flatten() for k in p])
        flat_g = torch.cat([gr.flatten() for gr in grads])
        cos = torch.dot(flat_d, -flat_g) / (flat_d.norm() * flat_g.norm())
        assert float(cos) == pytest.approx(1.0, abs=1e-9)
        current = {k: v.detach() for k, v in nxt.items()}
    chained = inner_adapt(model, params_of(model), batch, steps=3, lr=lr, max_step_norm=bound)
    for k in current:
        torch.testing.assert_close(chained[k].detach(), current[k], rtol=0, atol=1e-12)
    # a loose bound does not clip: the step is lr * ||grad||
    start = params_of(model)
    free = inner_adapt(model, start, batch, steps=1, lr=1e-4, max_step_norm=1e3)
    plain = inner_adapt(model, start, batch, steps=1, lr=1e-4)
    for k in start:
        torch.testing.assert_close(free[k].detach(), plain[k].detach(), rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------
# meta-training on a toy task family
# ------------------------------------------------------------------------------------------


def _toy_tasks(
    m: int, g: torch.Generator, n: int = 10
) -> list[tuple[TransitionBatch, TransitionBatch]]:
    """m tasks of delta = k * action with k ~ U(-2, 2); (support, query) per task."""
    tasks = []
    for k in (torch.rand(m, generator=g) * 4 - 2).tolist():
        seeds = torch.randint(0, 2**31 - 1, (2,), generator=g).tolist()
        tasks.append(
            (
                linear_window(n, k, seed=seeds[0], dtype=torch.float32),
                linear_window(n, k, seed=seeds[1], dtype=torch.float32),
            )
        )
    return tasks


def test_meta_training_beats_pretraining_after_adaptation() -> None:
    cfg = MAMLConfig(hidden_sizes=(32, 32), inner_steps=1, inner_lr=0.1, max_step_norm=None)
    meta_steps, tasks_per_step = 250, 4
    torch.manual_seed(0)
    meta_model = DynamicsModel.from_config(1, 1, 1, 0, cfg)
    pre_model = copy.deepcopy(meta_model)

    t0 = time.perf_counter()
    trainer = MAMLTrainer(meta_model, cfg, meta_lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(meta_steps):
        stats = trainer.step(_toy_tasks(tasks_per_step, g))
    meta_time = time.perf_counter() - t0
    assert stats.n_tasks == tasks_per_step and stats.meta_grad_norm >= 0

    # baseline: plain supervised pretraining on the pooled data, same number of updates
    opt = torch.optim.Adam(pre_model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(meta_steps):
        pooled = TransitionBatch.cat([b for pair in _toy_tasks(tasks_per_step, g) for b in pair])
        opt.zero_grad()
        dynamics_loss(pre_model, dict(pre_model.named_parameters()), pooled).backward()
        opt.step()

    test_tasks = _toy_tasks(32, torch.Generator().manual_seed(99))
    meta_eval = MAMLTrainer(meta_model, cfg).evaluate(test_tasks)
    pre_eval = MAMLTrainer(pre_model, cfg).evaluate(test_tasks)
    print(
        f"meta-train {meta_time:.2f}s  meta pre/post {meta_eval.pre_adapt_loss:.3f}/"
        f"{meta_eval.post_adapt_loss:.3f}  pretrain pre/post {pre_eval.pre_adapt_loss:.3f}/"
        f"{pre_eval.post_adapt_loss:.3f}"
    )
    assert meta_eval.post_adapt_loss < 0.6 * meta_eval.pre_adapt_loss
    assert meta_eval.post_adapt_loss < 0.6 * pre_eval.post_adapt_loss


# ------------------------------------------------------------------------------------------
# online adapter: acceptance, rollback, reset
# ------------------------------------------------------------------------------------------


def _adapter_config(**overrides: object) -> MAMLConfig:
    base = dict(
        hidden_sizes=(),
        inner_steps=5,
        inner_lr=0.5,
        max_step_norm=None,
        holdout_fraction=0.25,
        rollback_tolerance=0.01,
        min_window=8,
    )
    base.update(overrides)
    return MAMLConfig(**base)  # type: ignore[arg-type]


def _conflicting_window(n: int = 16) -> TransitionBatch:
    """Oldest 75 %: delta = -(0.7 a + 0.3); most recent 25 %: delta = +(0.7 a + 0.3)."""
    w = linear_window(n, 0.7, 0.3, seed=5)
    n_adapt = n - n // 4
    delta = w.next_obs - w.obs
    delta[:n_adapt] *= -1
    return TransitionBatch(obs=w.obs, action=w.action, next_obs=w.obs + delta)


def test_online_adapt_accepts_then_rolls_back_exactly() -> None:
    model = zero_linear_model()
    adapter = OnlineAdapter(model, _adapter_config())
    meta_before = clone_params(adapter.meta_params)

    accepted = adapter.adapt(linear_window(16, 0.7, 0.3, seed=3))
    assert accepted.accepted and not accepted.rolled_back and accepted.reason == "improved"
    assert accepted.loss_after < 0.5 * accepted.loss_before
    assert (accepted.n_adapt, accepted.n_holdout) == (12, 4)
    assert accepted.version == adapter.version == 1
    assert accepted.step_norm > 0 and accepted.duration_s >= 0
    adapted = clone_params(adapter.current_params())
    assert not params_equal(adapted, meta_before)

    rejected = adapter.adapt(_conflicting_window())
    assert rejected.rolled_back and not rejected.accepted
    assert rejected.reason == "held-out loss worse"
    assert rejected.loss_after > rejected.loss_before
    assert rejected.version == adapter.version == 1
    assert params_equal(adapter.current_params(), adapted)  # exactly the previous weights
    assert adapter.rollback_count == 1 and adapter.adapt_count == 2
    assert params_equal(adapter.meta_params, meta_before)  # meta-init never modified

    snap = adapter.reset()
    assert snap.version == 2 and params_equal(adapter.current_params(), meta_before)


def test_online_adapt_rolls_back_from_meta_init_and_on_nan() -> None:
    adapter = OnlineAdapter(zero_linear_model(), _adapter_config())
    before = adapter.snapshot()
    result = adapter.adapt(_conflicting_window())
    assert result.rolled_back and adapter.snapshot() is before

    bad = linear_window(16, 0.7, seed=4)
    nan_window = TransitionBatch(obs=bad.obs, action=bad.action,
                                 next_obs=bad.next_obs * float("nan"))
    result = adapter.adapt(nan_window)
    assert result.rolled_back and result.reason == "non-finite"
    assert adapter.snapshot() is before
    with pytest.raises(ValueError, match="min_window"):
        adapter.adapt(linear_window(4, 0.7))


def test_adapt_from_current_continues_from_weights_in_use() -> None:
    window = linear_window(16, 0.7, 0.3, seed=3)
    cfg = _adapter_config(inner_steps=1, inner_lr=0.2)
    from_init = OnlineAdapter(zero_linear_model(), cfg)
    from_current = OnlineAdapter(
        zero_linear_model(), MAMLConfig(**{**cfg.to_dict(), "adapt_from": "current"})
    )
    for _ in range(3):
        r_init = from_init.adapt(window)
        r_cur = from_current.adapt(window)
    # from the meta-init every call gives the same candidate; continuing keeps improving
    assert r_init.loss_after == pytest.approx(r_init.loss_before)
    assert r_cur.accepted and r_cur.loss_after < 0.9 * r_init.loss_after


# ------------------------------------------------------------------------------------------
# action correction
# ------------------------------------------------------------------------------------------


def _gain_params(gain: float) -> dict[str, Tensor]:
    """Affine model with obs_dim = act_dim = target_dim = 2: delta = gain * action."""
    weight = torch.zeros(2, 4, dtype=torch.float64)
    weight[:, 2:] = gain * torch.eye(2, dtype=torch.float64)
    return {"net.0.weight": weight, "net.0.bias": torch.zeros(2, dtype=torch.float64)}


def test_correct_action_zero_when_models_agree() -> None:
    torch.manual_seed(0)
    model = DynamicsModel(3, 2, 2, latent_dim=2, hidden_sizes=(16,)).double()
    prior = params_of(model)
    obs = torch.randn(5, 3, dtype=torch.float64)
    z = torch.randn(5, 2, dtype=torch.float64)
    a_pi = torch.rand(5, 2, dtype=torch.float64) * 1.6 - 0.8
    for adapted in (prior, clone_params(prior)):
        out = correct_action(
            model, obs, a_pi, z, prior, adapted, steps=10, lr=0.5, trust_weight=0.1
        )
        assert torch.equal(out, a_pi)
    single = correct_action(model, obs[0], a_pi[0], z[0], prior, prior, 10, 0.5, 0.1)
    assert torch.equal(single, a_pi[0])


def test_correct_action_compensates_halved_gain_and_clamps() -> None:
    model = DynamicsModel(2, 2, 2, 0, hidden_sizes=()).double()
    prior, adapted = _gain_params(1.0), _gain_params(0.5)
    trust = 1e-3
    obs = torch.tensor([0.1, -0.4], dtype=torch.float64)
    a_pi = torch.tensor([0.3, -0.2], dtype=torch.float64)
    out = correct_action(
        model, obs, a_pi, None, prior, adapted, steps=40, lr=1.0, trust_weight=trust
    )
    # argmin (0.5 a - a_pi)^2 + t (a - a_pi)^2 = (0.5 + t) / (0.25 + t) * a_pi
    torch.testing.assert_close(out, (0.5 + trust) / (0.25 + trust) * a_pi, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out, 2 * a_pi, rtol=1e-2, atol=0)
    assert out.shape == a_pi.shape and out.grad_fn is None and not out.requires_grad

    big = torch.tensor([0.8, -0.7], dtype=torch.float64)
    clamped = correct_action(model, obs, big, None, prior, adapted, 40, 1.0, trust)
    assert torch.equal(clamped, torch.tensor([1.0, -1.0], dtype=torch.float64))
    low = torch.tensor([-0.5, -0.3], dtype=torch.float64)
    high = torch.tensor([1.2, 0.5], dtype=torch.float64)
    custom = correct_action(model, obs, big, None, prior, adapted, 40, 1.0, trust, low, high)
    assert torch.equal(custom, torch.tensor([1.2, -0.3], dtype=torch.float64))

    batch = torch.stack([a_pi, -a_pi, 0.5 * a_pi])
    out_b = correct_action(model, obs.expand(3, 2), batch, None, prior, adapted, 40, 1.0, trust)
    torch.testing.assert_close(
        out_b, (0.5 + trust) / (0.25 + trust) * batch, rtol=1e-8, atol=1e-10
    )


def test_correct_action_is_graph_free() -> None:
    """The correction runs on the control path: it must not leave an autograd graph behind
    (its cost is measured in benchmarks, not asserted here)."""
    torch.manual_seed(0)
    model = DynamicsModel(14, 7, 7, latent_dim=8, hidden_sizes=(128, 128))
    prior = dict(model.named_parameters())  # requires_grad tensors must not leak a graph
    adapted = {k: v.detach() + 0.01 * torch.randn_like(v) for k, v in prior.items()}
    obs, z = torch.randn(14), torch.randn(8)
    a_pi = torch.rand(7) * 2 - 1
    out = correct_action(model, obs, a_pi, z, prior, adapted, 10, 0.1, 0.1)
    assert out.grad_fn is None and not out.requires_grad
    assert not torch.equal(out, a_pi)


# ------------------------------------------------------------------------------------------
# background thread
# ------------------------------------------------------------------------------------------


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


def test_background_errors_are_counted_and_thread_survives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    adapter = OnlineAdapter(zero_linear_model(), _adapter_config())
    good = linear_window(16, 0.7, 0.3, seed=3)
    malformed = TransitionBatch(
        obs=torch.zeros(16, 3, dtype=torch.float64),
        action=torch.zeros(16, 1, dtype=torch.float64),
        next_obs=torch.zeros(16, 3, dtype=torch.float64),
    )
    calls = {"n": 0}

    def get_window() -> TransitionBatch | None:
        calls["n"] += 1
        if calls["n"] <= 3:
            return malformed  # adapt() raises (wrong obs width)
        if calls["n"] == 4:
            raise RuntimeError("sensor buffer unavailable")
        if calls["n"] == 5:
            return None  # skipped, not an error
        return good

    with caplog.at_level(logging.ERROR, logger="metarl_ros.learning.online_adapter"):
        adapter.start_background(get_window, period_s=0.002)
        try:
            assert _wait_for(lambda: adapter.adapt_count >= 2)
            assert adapter.running
        finally:
            adapter.stop()
    assert not adapter.running
    assert adapter.error_count == 4
    assert isinstance(adapter.last_error, RuntimeError)
    assert (
        adapter.version >= 1 and adapter.last_result is not None and adapter.last_result.accepted
    )
    assert sum("background adaptation failed" in r.getMessage() for r in caplog.records) == 4


def test_concurrent_readers_see_complete_versioned_params() -> None:
    torch.manual_seed(0)
    model = DynamicsModel(1, 1, 1, 0, hidden_sizes=(16,)).double()
    # huge tolerance: every candidate is accepted, so the weights change on every adaptation
    adapter_cfg = _adapter_config(
        hidden_sizes=(16,),
        inner_steps=2,
        inner_lr=0.3,
        rollback_tolerance=1e6,
        correction_steps=5,
        correction_lr=0.5,
    )
    published: dict[int, dict[str, Tensor]] = {}
    pub_lock = threading.Lock()

    def on_update(snap: ParamsSnapshot, _result) -> None:
        with pub_lock:
            published[snap.version] = clone_params(snap.params)

    adapter = OnlineAdapter(model, adapter_cfg, on_update=on_update)
    published[0] = clone_params(adapter.meta_params)
    windows = [linear_window(16, gain, seed=i) for i, gain in enumerate((1.5, -1.5, 0.5, -0.8))]
    counter = {"n": 0}

    def get_window() -> TransitionBatch:
        counter["n"] += 1
        return windows[counter["n"] % len(windows)]

    obs = torch.tensor([0.2], dtype=torch.float64)
    a_pi = torch.tensor([0.4], dtype=torch.float64)
    reads: list[tuple[int, dict[str, Tensor], Tensor]] = []
    reader_errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                snap = adapter.snapshot()
                params = {}
                for key, value in snap.params.items():
                    params[key] = value.clone()
                    time.sleep(0)  # yield the GIL mid-read to provoke interleavings
                out = adapter.correct_action(obs, a_pi, snapshot=snap)
                reads.append((snap.version, params, out))
        except BaseException as exc:  # pragma: no cover - reported below
            reader_errors.append(exc)

    thread = threading.Thread(target=reader)
    adapter.start_background(get_window, period_s=1e-4)
    thread.start()
    try:
        time.sleep(0.4)
    finally:
        stop.set()
        thread.join(5)
        adapter.stop()
    assert not reader_errors
    assert adapter.error_count == 0
    versions = {v for v, _, _ in reads}
    assert len(versions) >= 3, f"too few versions observed: {sorted(versions)}"
    for version, params, _out in reads:
        assert params_equal(params, published[version]), f"torn read at version {version}"
    # corrections computed concurrently equal a serial recomputation with the same weights
    for version, _, out in reads[:: max(1, len(reads) // 50)]:
        serial = adapter.correct_action(
            obs, a_pi, snapshot=ParamsSnapshot(version, published[version])
        )
        assert torch.equal(out, serial)
    assert any(not torch.equal(out, a_pi) for v, _, out in reads if v > 0)


# ------------------------------------------------------------------------------------------
# config, normaliser, serialisation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_sizes", (128, 0)),
        ("inner_steps", 0),
        ("inner_lr", -0.1),
        ("first_order", "yes"),
        ("max_step_norm", 0.0),
        ("holdout_fraction", 1.0),
        ("rollback_tolerance", -1e-3),
        ("correction_steps", -1),
        ("correction_lr", float("nan")),
        ("trust_weight", -1.0),
        ("adapt_from", "previous"),
        ("min_window", 1),
    ],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        MAMLConfig(**{field: value})


def test_transition_batch_checks_shapes_and_carries_optional_fields() -> None:
    obs, action = torch.zeros(3, 4, 5), torch.zeros(3, 4, 2)
    batch = TransitionBatch(obs=obs, action=action, next_obs=obs, reward=torch.zeros(3, 4))
    flat = batch.flatten()
    assert flat.obs.shape == (12, 5) and flat.reward.shape == (12,) and flat.latent is None
    assert len(flat) == 12 and flat[-1].obs.shape == (1, 5) and len(flat[2:5]) == 3
    both = TransitionBatch.cat([flat, flat.to(torch.float64)[:2].to(torch.float32)])
    assert len(both) == 14 and both.reward.shape == (14,)
    with pytest.raises(ValueError, match="mixing batches with and without reward"):
        TransitionBatch.cat([flat, TransitionBatch(obs=flat.obs, action=flat.action,
                                                   next_obs=flat.next_obs)])
    for bad, message in (
        (dict(next_obs=torch.zeros(3, 4, 6)), "next_obs must have the shape of obs"),
        (dict(action=torch.zeros(3, 5, 2)), "differ in batch shape"),
        (dict(reward=torch.zeros(3)), "reward must have shape"),
        (dict(latent=torch.zeros(4, 3, 1)), "latent must be"),
        (dict(obs=torch.zeros(5), next_obs=torch.zeros(5)), "batch dim"),
    ):
        with pytest.raises(ValueError, match=message):
            TransitionBatch(**{"obs": obs, "action": action, "next_obs": obs, **bad})


def test_normalizer_and_checkpoint_round_trip() -> None:
    torch.manual_seed(0)
    cfg = MAMLConfig(hidden_sizes=(16, 8), inner_lr=0.05, max_step_norm=None)
    model = DynamicsModel.from_config(4, 2, 2, 3, cfg)
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(64, 4, generator=g)
    next_obs = (
        obs
        + torch.tensor([2.0, -1.0, 0.0, 0.0])
        + torch.randn(64, 4, generator=g) * torch.tensor([3.0, 0.1, 1.0, 1.0])
    )
    batch = TransitionBatch(
        obs=obs, action=torch.randn(64, 2, generator=g), next_obs=next_obs,
        latent=torch.randn(64, 3, generator=g),
    )
    model.fit_normalizer(next_obs - obs)
    target = model.normalized_target(batch)
    torch.testing.assert_close(target.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.std(0), torch.ones(2), atol=1e-5, rtol=0)

    buffer = io.BytesIO()
    torch.save(make_checkpoint(model, cfg), buffer)
    buffer.seek(0)
    loaded_model, loaded_cfg = load_checkpoint(torch.load(buffer, weights_only=True))
    assert loaded_cfg == cfg
    for key, value in model.state_dict().items():
        assert torch.equal(loaded_model.state_dict()[key], value)
    with torch.no_grad():
        assert torch.equal(
            loaded_model(batch.obs, batch.action, batch.latent),
            model(batch.obs, batch.action, batch.latent),
        )
    with pytest.raises(ValueError, match="bogus"):
        MAMLConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# ------------------------------------------------------------------------------------------
# structured model: per-joint torque gain and bias (learning/torque_model.py)
# ------------------------------------------------------------------------------------------


def _joint_window(
    n: int, strength: tuple[float, float], bias: tuple[float, float]
) -> TransitionBatch:
    """delta_v_i = strength_i * a_i + bias_i (velocity block = obs[:, 2:4])."""
    g = torch.Generator().manual_seed(3)
    obs = torch.randn(n, 8, generator=g, dtype=torch.float64)
    action = torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1
    next_obs = obs.clone()
    next_obs[:, 2:4] += torch.tensor(strength) * action + torch.tensor(bias)
    return TransitionBatch(obs=obs, action=action, next_obs=next_obs)


def test_torque_model_adapts_only_the_head_and_recovers_gain_and_bias() -> None:
    model = toy_torque_model()
    cfg = MAMLConfig(hidden_sizes=(), inner_steps=200, inner_lr=0.5, max_step_norm=None)
    start = params_of(model)
    window = _joint_window(64, strength=(0.25, 1.0), bias=(0.0, 0.3))
    adapted = inner_adapt(
        model, start, window, cfg.inner_steps, cfg.inner_lr, adapt_names=adapted_names(model)
    )
    for name in start:
        changed = not torch.equal(adapted[name].detach(), start[name])
        assert changed == (name in {"gain_raw", "bias_raw"}), name
    k, beta = head_at(adapted)
    assert torch.allclose(k, torch.tensor([0.25, 1.0], dtype=torch.float64), atol=1e-3)
    assert torch.allclose(beta, torch.tensor([0.0, 0.3], dtype=torch.float64), atol=1e-3)

    # closed-form inverse: a + da under the adapted head does what a did under the reference
    obs, action = window.obs[:5], window.action[:5] * 0.2
    da = model.correction(obs, action, None, start, {k: v.detach() for k, v in adapted.items()})
    expected = torch.stack([action[:, 0] * (1 / 0.25 - 1), -0.3 * torch.ones(5)], -1)
    assert torch.allclose(da, expected.double(), atol=5e-3)
    assert torch.equal(
        model.correction(obs, action, None, start, start), torch.zeros(5, 2).double()
    )


def test_torque_model_meta_gradient_reaches_the_frozen_trunk() -> None:
    """MAML through a head-only inner loop still trains the frozen trunk and the head's step
    sizes, and the second-order terms are there."""
    pd = PDStructure((1.0, 1.0), (0.5, 0.5), (2.0, 2.0), 10.0, 1.0, 0.2)
    torch.manual_seed(0)
    model = TorqueGainDynamics(10, 2, 3, (8,), pd).double()
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(12, 10, generator=g, dtype=torch.float64)
    batch = TransitionBatch(
        obs=obs,
        action=torch.randn(12, 2, generator=g, dtype=torch.float64),
        next_obs=obs + 0.1 * torch.randn(12, 10, generator=g, dtype=torch.float64),
        latent=torch.randn(12, 3, generator=g, dtype=torch.float64),
    )
    names = adapted_names(model)
    trunk_grads = {}
    for first_order in (False, True):
        model.zero_grad()
        loss = maml_loss(
            model,
            [batch[:8]],
            [batch[8:]],
            inner_steps=2,
            inner_lr=0.1,
            first_order=first_order,
            adapt_names=names,
        )
        loss.backward()
        trunk_grads[first_order] = model.trunk[0].weight.grad.clone()
        assert float(trunk_grads[first_order].abs().sum()) > 0
        assert float(model.gain_log_step.grad.abs().sum()) > 0
    # the second-order terms through the head's inner steps change the trunk's meta-gradient
    assert not torch.allclose(trunk_grads[False], trunk_grads[True])


def _feed(adaptation: DynamicsAdaptation, steps: int, strength: tuple[float, float], seed: int):
    """Stream transitions of ``delta_v = strength * a + noise`` through ``adaptation`` (inline
    mode, as in evaluation); returns the (action, corrected action) pairs."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(steps):
        obs = torch.randn(8, generator=g).numpy()
        action = (torch.rand(2, generator=g) * 2 - 1).numpy()
        corrected = adaptation.apply(obs, action, None)
        next_obs = obs.copy()
        next_obs[2:4] += (
            torch.tensor(strength) * torch.from_numpy(corrected)
            + 0.01 * torch.randn(2, generator=g)
        ).numpy()
        adaptation.record(obs, corrected, next_obs, None)
        adaptation.maybe_step()
        pairs.append((action, corrected))
    return pairs


def test_structured_correction_needs_evidence_and_inverts_a_weak_joint() -> None:
    model = toy_torque_model().float()
    cfg = MAMLConfig(hidden_sizes=(), inner_steps=10, inner_lr=1.5, max_step_norm=None)
    # the lag gate off: this toy's observations carry no tracking error (tested below)
    adaptation = DynamicsAdaptation(
        model, cfg, window=40, adapt_every=10, max_correction=10.0, min_improvement=0.6,
        lag_band_rad=None,
    )
    # intact robot: the adapted head explains nothing better than the reference -> no change
    for action, corrected in _feed(adaptation, 120, (1.0, 1.0), seed=0):
        assert np.array_equal(action, corrected)
    assert not adaptation.active
    # joint 0 at a quarter of its strength: corrected (only it) once the window shows it
    pairs = _feed(adaptation, 120, (0.25, 1.0), seed=1)
    assert adaptation.active
    action, corrected = pairs[-1]
    assert corrected[1] == action[1]
    expected = np.clip(action[0] / 0.25, -1.0, 1.0)
    assert abs(corrected[0] - expected) < 0.05 * max(1.0, abs(expected))
    # the first correction waited for two agreeing adaptations after the fault's evidence
    first = next(i for i, (a, c) in enumerate(pairs) if not np.array_equal(a, c))
    assert first >= 20


def _held_bias(adaptation: DynamicsAdaptation, bias: tuple[float, float]) -> None:
    """Make ``adaptation`` hold a pure bias correction (gain ratio 1) on both joints."""
    adaptation._head_correction = (np.ones(2, np.float32), np.asarray(bias, np.float32))


def _gated(band: float, bias: tuple[float, float]) -> tuple[DynamicsAdaptation, float]:
    """A toy adaptation with the lag gate at ``band`` holding a pure ``bias`` correction, and
    its model's position-error scale."""
    model = toy_torque_model().float()
    adaptation = DynamicsAdaptation(model, MAMLConfig(hidden_sizes=()), max_correction=1.0,
                                    lag_band_rad=band)
    _held_bias(adaptation, bias)
    return adaptation, model.pd.position_error_scale


def _obs_with_lag(lag_rad: tuple[float, float], scale: float) -> np.ndarray:
    """Toy observation (4 blocks of 2) whose position-error block is ``q_ref - q = lag``."""
    obs = np.zeros(8, np.float32)
    obs[4:6] = np.asarray(lag_rad, np.float32) * scale
    return obs


def test_lag_gate_passes_a_correction_only_towards_the_reference() -> None:
    """Joint 0 lags its reference by twice the band below it, joint 1 sits the same distance
    above it; both corrections push upwards (+). Only joint 0's acts, and in full."""
    band = 0.005
    adaptation, scale = _gated(band, (0.3, 0.3))
    obs = _obs_with_lag((2 * band, -2 * band), scale)
    action = np.zeros(2, np.float32)
    for _ in range(10 * LAG_HORIZON_TICKS):  # the mean lag settles
        corrected = adaptation.apply(obs, action, None)
    np.testing.assert_allclose(corrected, [0.3, 0.0], atol=1e-6)
    # the same correction pushing downwards: now joint 1 gets it
    _held_bias(adaptation, (-0.3, -0.3))
    np.testing.assert_allclose(adaptation.apply(obs, action, None), [0.0, -0.3], atol=1e-6)


def test_lag_gate_scales_with_the_mean_lag_and_forgets_it_on_reset() -> None:
    band = 0.01
    adaptation, scale = _gated(band, (0.2, 0.2))
    obs = _obs_with_lag((0.25 * band, 0.0), scale)
    for _ in range(10 * LAG_HORIZON_TICKS):
        corrected = adaptation.apply(obs, np.zeros(2, np.float32), None)
    # a quarter of the band -> a quarter of the correction; a joint on its reference -> none
    np.testing.assert_allclose(corrected, [0.05, 0.0], atol=1e-4)
    # one tick after a step in the lag the mean has moved 1/LAG_HORIZON_TICKS of the way
    adaptation.reset()
    _held_bias(adaptation, (0.2, 0.2))
    first = adaptation.apply(_obs_with_lag((band, 0.0), scale), np.zeros(2, np.float32), None)
    np.testing.assert_allclose(first, [0.2 / LAG_HORIZON_TICKS, 0.0], atol=1e-6)


def test_lag_gate_mean_skips_a_non_finite_reading() -> None:
    band = 0.01
    adaptation, scale = _gated(band, (0.2, 0.2))
    obs = _obs_with_lag((band, band), scale)
    for _ in range(10 * LAG_HORIZON_TICKS):
        adaptation.apply(obs, np.zeros(2, np.float32), None)
    bad = obs.copy()
    bad[4] = np.nan
    adaptation.apply(bad, np.zeros(2, np.float32), None)
    np.testing.assert_allclose(adaptation.apply(obs, np.zeros(2, np.float32), None),
                               [0.2, 0.2], atol=1e-4)


def test_lag_band_must_be_positive_or_none() -> None:
    model = toy_torque_model().float()
    for bad in (0.0, -0.01, float("nan")):
        with pytest.raises(ValueError, match="lag_band_rad"):
            DynamicsAdaptation(model, MAMLConfig(hidden_sizes=()), lag_band_rad=bad)
    off = DynamicsAdaptation(model, MAMLConfig(hidden_sizes=()), lag_band_rad=None)
    assert off.lag_band_rad is None
    default = DynamicsAdaptation(model, MAMLConfig(hidden_sizes=()))
    assert default.lag_band_rad == STRUCTURED_DEFAULTS["lag_band_rad"]


def _formula(settings, held, mean_lag, errors, action):
    """The structured correction as written in its docstring, in numpy float64 (the
    applier runs it joint by joint on Python floats): ``(r - 1) u + c``, bounded, through
    the lag gate, added to the action and clipped. Returns (action, new mean lag)."""
    n = settings.act_dim
    e, ed = np.asarray(errors[:n], float), np.asarray(errors[n:], float)
    lag = mean_lag + (e / settings.position_error_scale - mean_lag) / LAG_HORIZON_TICKS
    u = action.astype(float) + settings.kp_u * e + settings.kd_u * ed
    offset = np.clip((held.ratio.astype(float) - 1.0) * u + held.bias, -settings.max_correction,
                     settings.max_correction)
    gate = np.clip(np.sign(offset) * lag / settings.lag_band_rad, 0.0, 1.0)
    return np.clip(action + offset * gate, -1.0, 1.0), lag


def test_structured_correction_is_the_formula_joint_by_joint() -> None:
    """apply (observation) and apply_to_errors (the errors alone) give what the formula
    gives, over corrections that saturate and gates that open partly; a non-finite error
    gives a non-finite action and leaves the mean lag alone."""
    from metarl_ros.policy.dynamics_adaptation import correction_settings
    from metarl_ros.policy.held_correction import CorrectionApplier, HeldCorrection

    settings = correction_settings(toy_torque_model().float(), 0.3, 0.01)
    applier = CorrectionApplier(settings)
    rng = np.random.default_rng(3)
    lag, partly_open = np.zeros(2), 0
    for i in range(300):
        if i % 30 == 0:
            applier.hold(HeldCorrection(rng.uniform(0.2, 2.0, 2).astype(np.float32),
                                        rng.normal(0.0, 0.2, 2).astype(np.float32),
                                        np.zeros(2, np.float32), True))
        obs = (rng.normal(size=8) * [0, 0, 0, 0, 0.1, 0.1, 1, 1]).astype(np.float32)
        action = rng.uniform(-1.2, 1.2, 2).astype(np.float32)
        expected, lag = _formula(settings, applier.held, lag, obs[4:8].tolist(), action)
        got = (applier.apply(obs, action) if i % 2 else
               applier.apply_to_errors(obs[4:8].tolist(), action))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected.astype(np.float32), rtol=0, atol=1e-7)
        np.testing.assert_allclose(applier.mean_lag, lag, rtol=1e-12, atol=1e-15)
        partly_open += bool(((0.0 < np.abs(lag)) & (np.abs(lag) < settings.lag_band_rad)).any())
    assert partly_open > 100  # the gate was between closed and open on most ticks
    for bad in (np.nan, np.inf):
        for index in (4, 6):  # a position error (mean kept), a velocity error
            obs[index] = bad
            before = applier.mean_lag
            assert not np.isfinite(applier.apply(obs, action)).all()
            if index == 4:
                np.testing.assert_array_equal(applier.mean_lag, before)
            obs[index] = 0.0
