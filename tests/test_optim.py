"""gradfuse.optim.LARS and LARSWrapper against float64 references, on a real model."""

import io

import gradfuse
import pytest
import torch
from gradfuse.optim import LARS, LARSWrapper
from references import lars_reference


def small_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 10),
    )


def loss_of(model, gen):
    x = torch.randn(16, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    return torch.nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("lr_in_momentum", [False, True])
def test_lars_matches_reference_over_steps(gen, nesterov, lr_in_momentum):
    torch.manual_seed(int(gen.initial_seed()) % 2**31)
    model = small_cnn()
    hyper = {
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "trust_coefficient": 0.02,
        "eps": 1e-8,
    }
    opt = LARS(model.parameters(), **hyper, nesterov=nesterov, lr_in_momentum=lr_in_momentum)
    shadow = [p.detach().double().clone() for p in model.parameters()]
    bufs = [torch.zeros_like(s) for s in shadow]
    for _ in range(5):
        opt.zero_grad()
        loss_of(model, gen).backward()
        for i, p in enumerate(model.parameters()):
            full = p.ndim > 1  # biases and BatchNorm: plain momentum SGD
            shadow[i], bufs[i] = lars_reference(
                shadow[i],
                p.grad,
                bufs[i],
                **hyper,
                nesterov=nesterov,
                lr_in_momentum=lr_in_momentum,
                use_lars=full,
                use_wd=full,
            )
        opt.step()
        for p, s in zip(model.parameters(), shadow):
            torch.testing.assert_close(p.detach().double(), s, rtol=1e-5, atol=1e-6)
            p.data.copy_(s)  # keep the two trajectories on the same point


@pytest.mark.timeout(300)
def test_compiled_step_matches_eager(gen):
    """torch.compile(fullgraph=True) of a function calling opt.step() traces LARS whole (the
    custom ops' fake kernels, no norm cache in the graph) and steps as eager does."""
    torch.manual_seed(int(gen.initial_seed()) % 2**31)
    eager_model = small_cnn()
    compiled_model = small_cnn()
    compiled_model.load_state_dict(eager_model.state_dict())
    hyper = {"lr": 0.05, "weight_decay": 1e-3, "trust_coefficient": 0.02, "nesterov": True}
    eager_opt = LARS(eager_model.parameters(), **hyper)
    compiled_opt = LARS(compiled_model.parameters(), **hyper)

    @torch.compile(fullgraph=True)
    def compiled_step():
        compiled_opt.step()

    for i in range(3):  # the first step creates the momentum buffers inside the graph
        for model, step in ((eager_model, eager_opt.step), (compiled_model, compiled_step)):
            model.zero_grad()
            loss_of(model, torch.Generator().manual_seed(i)).backward()
            step()
        for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not compiled_opt._norms._param_sq  # the graph keeps no norms: nothing stale


def test_per_group_override_and_state_dict_round_trip(gen):
    model = small_cnn()
    head = list(model[4].parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    opt = LARS(
        [{"params": body}, {"params": head, "exclude_bias_and_norm": False, "lr": 0.01}],
        lr=0.1,
        weight_decay=1e-4,
    )
    loss_of(model, gen).backward()
    opt.step()
    assert opt.param_groups[1]["exclude_bias_and_norm"] is False
    state = opt.state_dict()
    clone = small_cnn()
    clone.load_state_dict(model.state_dict())
    clone_head = list(clone[4].parameters())
    clone_body = [p for p in clone.parameters() if all(p is not h for h in clone_head)]
    opt2 = LARS([{"params": clone_body}, {"params": clone_head}], lr=0.5)
    buffer = io.BytesIO()  # a real checkpoint: state_dict() tensors alias the live state
    torch.save(state, buffer)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer))
    assert opt2.param_groups[1]["lr"] == 0.01
    for p, q in zip(body + head, clone_body + clone_head):
        q.grad = p.grad.clone()
    opt.step()
    opt2.step()
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_grad_scaler_skips_on_inf_and_unscales_in_the_kernel(gen):
    model = small_cnn()
    reference = small_cnn()
    reference.load_state_dict(model.state_dict())
    opt = LARS(model.parameters(), lr=0.1, weight_decay=1e-4)
    ref_opt = LARS(reference.parameters(), lr=0.1, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    seed = int(gen.initial_seed())
    scaler.scale(loss_of(model, torch.Generator().manual_seed(seed))).backward()
    loss_of(reference, torch.Generator().manual_seed(seed)).backward()
    scaler.step(opt)
    scaler.update()
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)

    # An injected inf: the step is skipped on the device and the scale backs off.
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(loss_of(model, gen)).backward()
    next(model.parameters()).grad[0].view(-1)[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 512.0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_one_fused_call_per_device_and_dtype(gen, monkeypatch):
    model = small_cnn()
    calls = []
    real = gradfuse.ops.lars_update_from_norms_  # the CPU step: one pass
    monkeypatch.setattr(
        gradfuse.ops,
        "lars_update_from_norms_",
        lambda *a, **k: calls.append(len(a[0])) or real(*a, **k),
    )
    opt = LARS(model.parameters(), lr=0.1)
    loss_of(model, gen).backward()
    opt.step()
    assert calls == [len(list(model.parameters()))]


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="LARS: lr must be a non-negative number, got -1"):
        LARS(small_cnn().parameters(), lr=-1)
    with pytest.raises(ValueError, match="nesterov=True needs a momentum > 0"):
        LARS(small_cnn().parameters(), lr=0.1, momentum=0, nesterov=True)


def test_lars_wrapper_scales_gradients_like_larc(gen):
    model = small_cnn()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0, weight_decay=1e-3)
    opt = LARSWrapper(sgd, trust_coefficient=0.02)
    loss_of(model, gen).backward()
    expected = []
    for p in model.parameters():
        w, g = p.detach().double(), p.grad.double()
        if p.ndim > 1:
            trust = 0.02 * w.norm() / (g.norm() + 1e-3 * w.norm() + 1e-8)
            expected.append(w - 0.1 * trust * (g + 1e-3 * w))
        else:
            expected.append(w - 0.1 * (g + 1e-3 * w))
    opt.step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-7)
    assert sgd.param_groups[0]["weight_decay"] == 1e-3  # restored after the step
    assert opt.param_groups is sgd.param_groups
