"""SSFL's defining pieces, called directly: saliency, the global top-k mask, sparse training, the payload."""

import numpy as np
import pytest
import torch
from torch import nn

from fedsparse import sparse, transport
from fedsparse.models import build_model, maskable_names
from fedsparse.train import TrainConfig, saliency_scores, train_local


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_saliency_is_abs_weight_times_gradient_by_hand():
    model = tiny_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = rng.integers(0, 2, size=8)
    scores = saliency_scores(model, x, y, ["0.weight", "2.weight"], batch_size=8, batches=1, seed=0)
    # by hand: forward and backward on the same 8 examples (a batch of the whole set, any order)
    ref = tiny_model()
    loss = nn.functional.cross_entropy(ref(torch.from_numpy(x)), torch.from_numpy(y))
    grads = torch.autograd.grad(loss, [ref[0].weight, ref[2].weight])
    for name, w, g in (("0.weight", ref[0].weight, grads[0]), ("2.weight", ref[2].weight, grads[1])):
        torch.testing.assert_close(scores[name], (w * g).abs().detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("density", [0.5, 0.2, 0.1, 0.05])
def test_global_topk_has_exactly_the_requested_density(density):
    gen = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(30, 20, generator=gen), "b": torch.rand(400, generator=gen), "c": torch.rand(7, 7)}
    scores["b"][:100] = 0.5  # many ties at one value: still exact
    masks = sparse.topk_mask(scores, density)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(density * total)
    kept_min = min(float(scores[k][m].min()) for k, m in masks.items() if m.any())
    dropped_max = max(float(scores[k][~m].max()) for k, m in masks.items() if (~m).any())
    assert kept_min >= dropped_max
    # the exact set, against a plain Python sort with ties to the earlier position in mask order (at density 0.5
    # the cut falls inside the 100 tied 0.5s): a tie broken otherwise, or non-deterministically, fails
    flat = torch.cat([scores[k].reshape(-1) for k in ("a", "b", "c")]).tolist()
    order = sorted(range(total), key=lambda i: (-flat[i], i))
    expected = torch.zeros(total, dtype=torch.bool)
    expected[order[:round(density * total)]] = True
    assert torch.equal(torch.cat([masks[k].reshape(-1) for k in ("a", "b", "c")]), expected)


def test_layerwise_scope_keeps_the_density_in_every_tensor():
    scores = {"a": torch.rand(100), "b": torch.rand(50) * 100}
    masks = sparse.topk_mask(scores, 0.2, scope="layerwise")
    assert int(masks["a"].sum()) == 20 and int(masks["b"].sum()) == 10


def test_a_mask_that_empties_a_layer_is_refused():
    scores = {"a": torch.zeros(100), "b": torch.ones(100)}
    with pytest.raises(sparse.MaskError, match="a"):
        sparse.topk_mask(scores, 0.1)
    layout = sparse.Layout(("a", "b"), (), {"a": (100,), "b": (100,)})
    with pytest.raises(sparse.MaskError):
        sparse.check_density(layout, 0.005, "global")  # 1 weight for 2 tensors
    sparse.check_density(layout, 0.01, "global")


def test_mask_bitmap_and_fingerprint_round_trip():
    model = build_model("cnn", (1, 16, 16), 10, seed=0)
    layout = sparse.Layout.of(model.state_dict(), maskable_names(model))
    masks = sparse.random_mask({k: layout.shapes[k] for k in layout.maskable}, 0.1, seed=3)
    bits = sparse.pack_mask(masks, layout)
    assert bits.dtype == np.uint8 and bits.size == (layout.num_maskable + 7) // 8
    back = sparse.unpack_mask(bits, layout)
    assert all(torch.equal(back[k], masks[k]) for k in masks)
    other = sparse.random_mask({k: layout.shapes[k] for k in layout.maskable}, 0.1, seed=4)
    assert sparse.fingerprint(bits) != sparse.fingerprint(sparse.pack_mask(other, layout))


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 5e-4), (0.9, 0.1)])
def test_pruned_weights_stay_exactly_zero_after_training(momentum, weight_decay):
    model = build_model("cnn", (1, 16, 16), 10, seed=0)
    names = maskable_names(model)
    masks = sparse.random_mask({k: model.state_dict()[k].shape for k in names}, 0.1, seed=0)
    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 16, 16), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, x, y, TrainConfig(epochs=2, batch_size=16, lr=0.1, momentum=momentum,
                                         weight_decay=weight_decay, grad_clip=10.0), seed=0, masks=masks)
    after = model.state_dict()
    for k in names:
        assert torch.all(after[k][~masks[k]] == 0.0), k
        assert not torch.equal(after[k][masks[k]], before[k][masks[k]]), f"{k} did not train"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_payload_round_trip_and_byte_formula(dtype):
    model = build_model("cnn", (1, 16, 16), 10, seed=0)
    state = model.state_dict()
    layout = sparse.Layout.of(state, maskable_names(model))
    masks = sparse.random_mask({k: layout.shapes[k] for k in layout.maskable}, 0.1, seed=0)
    values, dense = sparse.gather(state, layout, masks)
    rec = transport.make_payload(values, dense, dtype)
    got_values, got_dense = transport.read_payload(rec, layout, masks, dtype)
    tol = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
    torch.testing.assert_close(got_values, values, rtol=tol, atol=tol)
    rebuilt = sparse.scatter(got_values, got_dense, layout, masks)
    for k in layout.maskable:  # every weight back in its own place, the pruned ones zero
        expected = torch.where(masks[k], state[k], torch.zeros(()))
        torch.testing.assert_close(rebuilt[k], expected, rtol=tol, atol=tol)
    for k in layout.dense:
        torch.testing.assert_close(rebuilt[k], state[k], rtol=tol, atol=tol)
    # np.save writes a 128-byte header for these 1-D arrays; count_bytes adds the key lengths
    n_values, n_dense = sparse.num_values(layout, masks)
    width = 4 if dtype == "float32" else 2
    assert rec.count_bytes() == 2 * 128 + (n_values + n_dense) * width + len("values") + len("dense")


def test_bfloat16_travels_as_raw_16_bit_words():
    x = torch.tensor([1.0, -2.5, 3.140625, 0.0])
    wire = transport.to_wire(x, "bfloat16")
    assert wire.dtype == np.uint16
    assert torch.equal(transport.from_wire(wire, "bfloat16"), x.to(torch.bfloat16).float())
