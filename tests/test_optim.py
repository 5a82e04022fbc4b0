"""TAM, AdaTAM, AdaTAMW and the optimiser registry: exact checks of the damping, the SGD and Adam limits, argument
checks and state_dict round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedsparse.optim import OPTIMIZERS, SGD, TAM, AdaTAM, AdaTAMW, build_optimizer

BETA = 0.9


def aligned_model() -> tuple[nn.Linear, torch.Tensor]:
    """A linear unit whose gradients stay parallel to its momentum: loss = softplus(w.x + b) on one fixed input,
    so grad_w is a positive multiple of x, grad_b is positive, and w starts as a multiple of x (weight decay, L2 or
    decoupled, keeps it so)."""
    x = torch.tensor([0.5, -1.25, 2.0, 0.75])
    model = nn.Linear(4, 1)
    with torch.no_grad():
        model.weight.copy_(0.3 * x)
        model.bias.fill_(0.2)
    return model, x


def run_steps(model: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.softplus(model(x)).sum().backward()
        optimizer.step()


def one_tensor_step(optimizer_class: type, first_grad: torch.Tensor, grad: torch.Tensor, **kwargs
                    ) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    """An optimiser over one parameter after two steps: the first with gradient `first_grad` (which becomes the
    momentum, whole), the second with `grad`."""
    param = nn.Parameter(torch.zeros_like(grad))
    optimizer = optimizer_class([param], **kwargs)
    for g in (first_grad, grad):
        param.grad = g.clone()
        optimizer.step()
    return optimizer, param


def test_momentum_equal_to_gradient_gives_damping_one_and_tam_is_sgd_momentum():
    tam_model, x = aligned_model()
    sgd_model = copy.deepcopy(tam_model)
    tam = TAM(tam_model.parameters(), lr=0.05, momentum=BETA, weight_decay=1e-3)  # default decay_rate and eps
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.05, momentum=BETA, dampening=0.0, weight_decay=1e-3)
    for _ in range(8):
        run_steps(tam_model, x, tam, 1)
        run_steps(sgd_model, x, sgd, 1)
        assert all(float(tam.state[p]["damping"]) == 1.0 for p in tam_model.parameters())
        for p_tam, p_sgd in zip(tam_model.parameters(), sgd_model.parameters(), strict=True):
            assert torch.equal(p_tam, p_sgd)
            assert torch.equal(tam.state[p_tam]["momentum_buffer"], sgd.state[p_sgd]["momentum_buffer"])


def test_tam_is_not_sgd_when_gradients_turn():
    """The equality above is not vacuous: on a real problem the damping drops below 1 and TAM departs from SGD."""
    torch.manual_seed(0)
    data, target = torch.randn(64, 5), torch.randint(0, 3, (64,))
    tam_model = nn.Linear(5, 3)
    sgd_model = copy.deepcopy(tam_model)
    tam = TAM(tam_model.parameters(), lr=0.5, momentum=BETA)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.5, momentum=BETA)
    for start in range(0, 64, 8):
        for model, optimizer in ((tam_model, tam), (sgd_model, sgd)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(data[start:start + 8]), target[start:start + 8]).backward()
            optimizer.step()
    assert min(float(tam.state[p]["damping"]) for p in tam_model.parameters()) < 0.9
    assert not torch.equal(tam_model.weight, sgd_model.weight)


def test_opposite_gradient_enters_with_only_eps():
    momentum = torch.tensor([1.0, -2.0, 3.0])
    optimizer, param = one_tensor_step(TAM, momentum, -2.0 * momentum, lr=1.0, momentum=BETA, decay_rate=0.0,
                                       eps=1e-3)
    state = optimizer.state[param]
    assert float(state["damping"]) == pytest.approx(0.0, abs=1e-12)
    expected = BETA * momentum + 1e-3 * (-2.0 * momentum)
    torch.testing.assert_close(state["momentum_buffer"], expected, rtol=1e-6, atol=0.0)


def test_orthogonal_gradient_gets_half():
    momentum, grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, -2.0, 5.0])
    optimizer, param = one_tensor_step(TAM, momentum, grad, lr=1.0, momentum=BETA, decay_rate=0.0, eps=0.0)
    state = optimizer.state[param]
    assert float(state["damping"]) == 0.5
    assert torch.equal(state["momentum_buffer"], BETA * momentum + 0.5 * grad)


def test_damping_is_the_smoothed_real_cosine():
    """decay_rate 0.75, cosine 0.6 after the first step (s = 1): s = 0.75 + 0.25 * 0.6 = 0.9, d = 0.95."""
    momentum, grad = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8])  # unit vectors, cosine 0.6
    optimizer, param = one_tensor_step(TAM, momentum, grad, lr=1.0, momentum=0.5, decay_rate=0.75, eps=0.0)
    state = optimizer.state[param]
    assert float(state["smoothed_cosine"]) == pytest.approx(0.9, abs=1e-7)
    assert float(state["damping"]) == pytest.approx(0.95, abs=1e-7)
    torch.testing.assert_close(state["momentum_buffer"], 0.5 * momentum + 0.95 * grad)


def test_global_and_per_tensor_cosines_differ():
    """Two tensors: one gradient along its momentum, one against it, same norms. Per tensor the damping is 1 and 0;
    one global cosine is (1 - 1) / 2 = 0, so both get 1/2."""
    damping = {}
    for cosine in ("tensor", "global"):
        first, second = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
        optimizer = TAM([first, second], lr=1.0, decay_rate=0.0, cosine=cosine)
        for sign in (1.0, -1.0):
            first.grad, second.grad = torch.tensor([1.0, 2.0]), sign * torch.tensor([2.0, -1.0])
            optimizer.step()
        damping[cosine] = [float(optimizer.state[p]["damping"]) for p in (first, second)]
    assert damping["tensor"] == [1.0, pytest.approx(0.0, abs=1e-12)]
    assert damping["global"] == [0.5, 0.5]


def test_zero_momentum_gives_cosine_zero_not_nan():
    optimizer, param = one_tensor_step(TAM, torch.zeros(3), torch.ones(3), lr=1.0, decay_rate=0.0, eps=0.0)
    assert float(optimizer.state[param]["damping"]) == 0.5
    assert torch.isfinite(param).all()


@pytest.mark.parametrize("optimizer_class", [TAM, AdaTAM, AdaTAMW])
@pytest.mark.parametrize(("argument", "value"), [
    ("lr", -0.1), ("decay_rate", 1.5), ("decay_rate", float("nan")), ("eps", -1e-8), ("weight_decay", -1.0),
    ("cosine", "layer"),
])
def test_bad_arguments_raise_value_error_naming_them(optimizer_class, argument, value):
    with pytest.raises(ValueError, match=argument):
        optimizer_class([nn.Parameter(torch.zeros(2))], **{argument: value})


@pytest.mark.parametrize(("optimizer_class", "kwargs", "argument"), [
    (TAM, {"momentum": 1.0}, "momentum"), (TAM, {"momentum": -0.1}, "momentum"),
    (AdaTAM, {"betas": (1.0, 0.999)}, r"betas\[0\]"), (AdaTAM, {"betas": (0.9, -0.1)}, r"betas\[1\]"),
    (AdaTAMW, {"betas": (0.9,)}, "betas"),
])
def test_bad_momentum_and_betas_raise(optimizer_class, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        optimizer_class([nn.Parameter(torch.zeros(2))], **kwargs)


def make_problem(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), torch.randn(48, 6), torch.randint(0, 3, (48,))


def train_batches(model: nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor, target: torch.Tensor,
                  batches: range) -> None:
    for b in batches:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(data[b * 8:(b + 1) * 8]), target[b * 8:(b + 1) * 8]).backward()
        optimizer.step()


@pytest.mark.parametrize(("optimizer_class", "kwargs"), [
    (TAM, {"lr": 0.1, "weight_decay": 1e-3}), (TAM, {"lr": 0.1, "cosine": "global"}),
    (AdaTAM, {"lr": 1e-3}), (AdaTAMW, {"lr": 1e-3, "bias_correction": True}),
])
def test_state_dict_round_trip_resumes_identically(optimizer_class, kwargs, tmp_path):
    model, data, target = make_problem(0)
    optimizer = optimizer_class(model.parameters(), **kwargs)
    train_batches(model, optimizer, data, target, range(3))
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "checkpoint.pt")
    train_batches(model, optimizer, data, target, range(3, 6))

    resumed_model, _, _ = make_problem(1)  # different weights, overwritten by the checkpoint
    checkpoint = torch.load(tmp_path / "checkpoint.pt")
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = optimizer_class(resumed_model.parameters(), **kwargs)
    resumed.load_state_dict(checkpoint["optimizer"])
    train_batches(resumed_model, resumed, data, target, range(3, 6))
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("optimizer_class", [TAM, AdaTAM, AdaTAMW])
def test_none_gradients_are_skipped_and_sparse_ones_densified(optimizer_class):
    torch.manual_seed(0)
    sparse_embedding = nn.Embedding(10, 4, sparse=True)
    dense_embedding = copy.deepcopy(sparse_embedding)
    dense_embedding.sparse = False
    initial = sparse_embedding.weight.detach().clone()
    unused = nn.Parameter(torch.ones(3))
    sparse_opt = optimizer_class([*sparse_embedding.parameters(), unused], lr=0.1)
    dense_opt = optimizer_class(dense_embedding.parameters(), lr=0.1)
    for rows in ([1, 2, 2], [2, 7], [1, 9]):
        for embedding, optimizer in ((sparse_embedding, sparse_opt), (dense_embedding, dense_opt)):
            optimizer.zero_grad(set_to_none=True)
            embedding(torch.tensor(rows)).square().sum().backward()
            optimizer.step()
    assert sparse_embedding.weight.grad.is_sparse
    assert torch.equal(sparse_embedding.weight, dense_embedding.weight)
    assert not torch.equal(sparse_embedding.weight, initial)  # it did train
    assert torch.equal(unused, torch.ones(3)) and unused not in sparse_opt.state


def test_adatam_follows_its_formula_by_hand():
    """Two steps on one tensor, defaults except decay_rate 0.5: m1 = g1; m2 = b1 m1 + (eps + d2) g2 with
    d2 = (1 + (0.5 + 0.5 cos)) / 2; v = b2 v + (1 - b2) g^2; p -= lr m / (sqrt(v) + eps), no bias correction."""
    g1, g2 = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64), torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64)
    lr, (b1, b2), eps = 0.01, (0.9, 0.999), 1e-8
    param = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = AdaTAM([param], lr=lr, decay_rate=0.5)
    expected = torch.zeros(3, dtype=torch.float64)
    m, v = g1.clone(), (1 - b2) * g1**2
    expected -= lr * m / (v.sqrt() + eps)
    cosine = float(g1 @ g2 / (g1.norm() * g2.norm()))
    d2 = (1 + (0.5 + 0.5 * cosine)) / 2
    m, v = b1 * m + (eps + d2) * g2, b2 * v + (1 - b2) * g2**2
    expected -= lr * m / (v.sqrt() + eps)
    for g in (g1, g2):
        param.grad = g.clone()
        optimizer.step()
    assert float(optimizer.state[param]["damping"]) == pytest.approx(d2, abs=1e-15)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize(("ours", "theirs", "weight_decay"), [
    (AdaTAM, torch.optim.Adam, 0.0), (AdaTAM, torch.optim.Adam, 1e-2), (AdaTAMW, torch.optim.AdamW, 0.1),
])
def test_adatam_with_bias_correction_is_adam_while_gradients_stay_aligned(ours, theirs, weight_decay):
    our_model, x = aligned_model()
    their_model = copy.deepcopy(our_model)
    optimizer = ours(our_model.parameters(), lr=0.02, weight_decay=weight_decay, bias_correction=True)
    reference = theirs(their_model.parameters(), lr=0.02, weight_decay=weight_decay)
    for _ in range(12):
        run_steps(our_model, x, optimizer, 1)
        run_steps(their_model, x, reference, 1)
        assert all(float(optimizer.state[p]["damping"]) == 1.0 for p in our_model.parameters())
    moved = (their_model.weight - 0.3 * x).abs().max()
    assert moved > 0.1  # the runs went somewhere
    for p, q in zip(our_model.parameters(), their_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_adatamw_decays_the_weights_not_the_gradient():
    """With a zero gradient only the decoupled decay moves the weights: p <- p (1 - lr wd), exactly."""
    param = nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = AdaTAMW([param], lr=0.1, weight_decay=0.5)
    param.grad = torch.zeros(2)
    optimizer.step()
    assert torch.equal(param.detach(), torch.tensor([1.0, -2.0]) * (1 - 0.1 * 0.5))


def test_registry_names_and_builders():
    assert set(OPTIMIZERS) == {"sgd", "adam", "tam", "adatam", "adatamw"}
    params = [nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer("sgd", params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    assert type(sgd) is SGD
    assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.05, 0.9, 1e-4)
    assert build_optimizer("adam", params, lr=1e-3, momentum=0.8, weight_decay=0.0).defaults["betas"] == (0.8, 0.999)
    tam = build_optimizer("tam", params, lr=0.1, momentum=0.7, weight_decay=0.0, cosine="global")
    assert type(tam) is TAM and tam.defaults["momentum"] == 0.7 and tam.defaults["cosine"] == "global"
    assert type(build_optimizer("adatam", params, lr=1e-3, momentum=0.9, weight_decay=0.0)) is AdaTAM
    assert type(build_optimizer("adatamw", params, lr=1e-3, momentum=0.9, weight_decay=0.0)) is AdaTAMW


def test_unknown_optimizer_lists_the_registry():
    with pytest.raises(ValueError, match="lion.*sgd, adam, tam, adatam, adatamw"):
        build_optimizer("lion", [nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.0, weight_decay=0.0)


def test_run_config_key_takes_its_choices_from_the_registry():
    from fedsparse.config import SCHEMA, ConfigError, resolve

    assert SCHEMA["optimizer"].choices == tuple(OPTIMIZERS)
    assert resolve({"optimizer": "adatamw"})["optimizer"] == "adatamw"
    with pytest.raises(ConfigError, match="optimizer.*sgd, adam, tam, adatam, adatamw"):
        resolve({"optimizer": "lion"})
