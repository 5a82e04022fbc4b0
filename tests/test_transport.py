"""The int8 payload (`sparse.value-dtype = "int8"`): per-block scales, rounding error, bytes, strict reading."""

import functools
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedsparse import sparse, transport
from fedsparse.config import resolve
from fedsparse.models import build_model, maskable_names
from fedsparse.transport import INT8_BLOCK, Int8Blocks, ReplyError, dequantize_int8, quantize_int8


@functools.cache
def cnn_payload_parts() -> tuple[sparse.Layout, sparse.Masks, torch.Tensor, torch.Tensor]:
    """A cnn for 16x16 images under a 10% random mask: (layout, masks, masked values, dense tensors); built once,
    so no test may change them in place."""
    model = build_model("cnn", (1, 16, 16), 10, seed=0)
    state = model.state_dict()
    layout = sparse.Layout.of(state, maskable_names(model))
    masks = sparse.random_mask({k: layout.shapes[k] for k in layout.maskable}, 0.1, seed=0)
    values, dense = sparse.gather(state, layout, masks)
    return layout, masks, values, dense


def block_scales_per_value(blocks: Int8Blocks) -> torch.Tensor:
    return torch.from_numpy(np.repeat(blocks.scales, INT8_BLOCK)[: blocks.codes.size].astype(np.float32))


def test_int8_is_a_value_dtype_of_the_config():
    assert resolve({"strategy": "ssfl", "sparse.value-dtype": "int8"})["sparse.value-dtype"] == "int8"


def test_quantize_by_hand():
    # scale 0.25 (exact in binary): 31.75 = 127 x 0.25 is the peak; -2.5 = -10 x 0.25; 0.3 / 0.25 = 1.2 -> 1
    blocks = quantize_int8(torch.tensor([31.75, -2.5, 0.3, 0.0]))
    assert blocks.codes.dtype == np.int8 and blocks.codes.tolist() == [127, -10, 1, 0]
    assert blocks.scales.dtype == np.float32 and blocks.scales.tolist() == [0.25]
    assert dequantize_int8(blocks).tolist() == [31.75, -2.5, 0.25, 0.0]


def test_each_block_has_its_own_scale_and_nearest_is_within_half_a_scale():
    rng = np.random.default_rng(0)
    n = 3 * INT8_BLOCK + 17  # a partial last block
    magnitudes = np.repeat([1e-6, 1e-2, 1.0, 1e3], INT8_BLOCK)[:n]
    x = torch.from_numpy((rng.normal(size=n) * magnitudes).astype(np.float32))
    blocks = quantize_int8(x)
    assert blocks.scales.shape == (4,) and blocks.codes.shape == (n,)
    peaks = [float(x[i:i + INT8_BLOCK].abs().max()) for i in range(0, n, INT8_BLOCK)]
    np.testing.assert_allclose(blocks.scales, np.array(peaks) / 127, rtol=1e-6)
    error = (dequantize_int8(blocks) - x).abs()
    assert bool((error <= block_scales_per_value(blocks) * (0.5 + 1e-5)).all())
    assert int(np.abs(blocks.codes).max()) == 127


def test_stochastic_rounding_is_unbiased_and_seeded():
    # ratios to the scale of 0.3 and -0.7 round to 0 and -1 when nearest: a bias of 0.3 and 0.3 scales
    x = torch.tensor([1.27, 0.003, -0.007, 0.5], dtype=torch.float32)
    scale = float(quantize_int8(x).scales[0])
    nearest = dequantize_int8(quantize_int8(x))
    assert abs(float(nearest[1] - x[1])) > 0.25 * scale
    draws = torch.stack([dequantize_int8(quantize_int8(x, "stochastic", seed)) for seed in range(4000)])
    assert bool(((draws - x).abs() <= scale * (1 + 1e-5)).all())  # floor or ceil, never further
    # the mean of 4000 draws is within 5 standard deviations (each draw's sd <= scale / 2)
    assert bool(((draws.mean(0) - x).abs() <= 5 * scale / (2 * math.sqrt(len(draws)))).all())
    again = quantize_int8(x, "stochastic", 7)
    assert np.array_equal(again.codes, quantize_int8(x, "stochastic", 7).codes)
    assert len({quantize_int8(x, "stochastic", s).codes.tobytes() for s in range(10)}) > 1
    with pytest.raises(ValueError, match="seed"):
        quantize_int8(x, "stochastic")
    with pytest.raises(ValueError, match="rounding"):
        quantize_int8(x, "up")


def test_zero_and_non_finite_blocks():
    x = torch.zeros(2 * INT8_BLOCK)
    x[INT8_BLOCK + 3] = float("nan")
    blocks = quantize_int8(x)
    assert blocks.scales[0] > 0 and np.isfinite(blocks.scales[0])  # an all-zero block: a valid scale
    assert bool((dequantize_int8(blocks)[:INT8_BLOCK] == 0).all())
    assert np.isnan(blocks.scales[1])  # travels, and the reader rejects it
    big = torch.tensor([3.0e38, -3.4e38, 1.0])  # near float32's largest: 127 x scale stays finite
    assert bool(torch.isfinite(dequantize_int8(quantize_int8(big))).all())


def test_int8_payload_round_trip_and_bytes():
    layout, masks, values, dense = cnn_payload_parts()
    rec = transport.make_payload(values, dense, "int8")
    assert sorted(rec) == sorted(["values", "dense", "values-scale", "dense-scale"])
    got_values, got_dense = transport.read_payload(rec, layout, masks, "int8")
    for sent, got in ((values, got_values), (dense, got_dense)):
        blocks = quantize_int8(sent)
        assert bool(((got - sent).abs() <= block_scales_per_value(blocks) * (0.5 + 1e-5)).all())
    n_values, n_dense = sparse.num_values(layout, masks)
    n_scales = math.ceil(n_values / INT8_BLOCK) + math.ceil(n_dense / INT8_BLOCK)
    assert transport.logical_payload_bytes(layout, masks, "int8") == n_values + n_dense + 4 * n_scales
    # np.save writes a 128-byte header for each 1-D array; count_bytes adds the key lengths
    keys = len("values") + len("dense") + len("values-scale") + len("dense-scale")
    assert rec.count_bytes() == 4 * 128 + n_values + n_dense + 4 * n_scales + keys
    float32_bytes = transport.make_payload(values, dense, "float32").count_bytes()
    assert rec.count_bytes() < 0.27 * float32_bytes


def test_an_empty_array_travels_with_no_scale():
    """top-k's model goes down with no masked values: an empty `values` with an empty `values-scale`."""
    model = build_model("mlp", (1, 16, 16), 10, seed=0)
    layout = sparse.Layout.of(model.state_dict(), maskable_names(model))
    _, dense = sparse.gather(model.state_dict(), layout, None)
    rec = transport.make_payload(torch.zeros(0), dense, "int8")
    assert rec["values"].shape == (0,) and rec["values-scale"].shape == (0,)
    values, got_dense = transport.read_payload(rec, layout, None, "int8")
    assert values.numel() == 0 and got_dense.shape == dense.shape
    assert transport.logical_payload_bytes(layout, None, "int8") == dense.numel() + 4 * math.ceil(dense.numel() / 256)


def test_stochastic_payload_is_reproducible_and_values_and_dense_draw_apart():
    _, _, values, dense = cnn_payload_parts()
    first = transport.make_payload(values, dense, "int8", rounding="stochastic", seed=3)
    second = transport.make_payload(values, dense, "int8", rounding="stochastic", seed=3)
    assert all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)
    same = torch.ones(INT8_BLOCK) * 0.5
    same[0] = 127.0  # ratio 0.5 everywhere else: each value is a coin flip
    rec = transport.make_payload(same, same, "int8", rounding="stochastic", seed=3)
    assert not np.array_equal(rec["values"].numpy(), rec["dense"].numpy())


def _int8_reply(**changes) -> tuple[ArrayRecord, sparse.Layout, sparse.Masks]:
    """An int8 payload of the cnn with some arrays replaced (None removes one)."""
    layout, masks, values, dense = cnn_payload_parts()
    arrays = dict(transport.make_payload(values, dense, "int8").items())
    for key, array in changes.items():
        key = key.replace("_", "-")
        if array is None:
            del arrays[key]
        else:
            arrays[key] = array
    return ArrayRecord(arrays), layout, masks


def _scales_with(value: float) -> Array:
    _, _, values, _ = cnn_payload_parts()
    scales = quantize_int8(values).scales.copy()
    scales[0] = value
    return Array(scales)


def _codes_with_minus_128() -> Array:
    _, _, values, _ = cnn_payload_parts()
    codes = quantize_int8(values).codes.copy()
    codes[5] = -128
    return Array(codes)


def _mislabelled_float_codes() -> Array:
    """An Array that says int8 but whose npy data is float32 of the same length."""
    _, _, values, _ = cnn_payload_parts()
    real = Array(values.numpy().astype(np.float32))
    return Array(dtype="int8", shape=real.shape, stype=real.stype, data=real.data)


MALFORMED = {
    "no scales": ({"values_scale": None}, "lacks values-scale"),
    "an extra array": ({"extra": Array(np.zeros(3, np.int8))}, "unexpected arrays extra"),
    "float codes": ({"values": Array(np.zeros(5, np.float32))}, "'values' has dtype float32, expected int8"),
    "codes too short": ({"dense": Array(np.zeros(3, np.int8))}, "'dense' has shape \\(3,\\)"),
    "one scale too few": ({"values_scale": Array(np.ones(1, np.float32))}, "'values-scale' has shape \\(1,\\)"),
    "float64 scales": ({"dense_scale": Array(np.ones(1, np.float64))}, "'dense-scale' has dtype float64"),
    "a zero scale": ({"values_scale": "0"}, "'values-scale' holds a scale that is not finite, not > 0"),
    "a negative scale": ({"values_scale": "-0.1"}, "'values-scale' holds a scale"),
    "a NaN scale": ({"values_scale": "nan"}, "'values-scale' holds a scale"),
    "an infinite scale": ({"values_scale": "inf"}, "'values-scale' holds a scale"),
    "a scale that overflows at 127": ({"values_scale": "3e36"}, "'values-scale' holds a scale"),
    "code -128": ({"values": "-128"}, "'values' holds the int8 code -128"),
    "float data labelled int8": ({"values": "mislabelled"}, "'values' holds .* of float32, expected .* of int8"),
    "garbled bytes": ({"values": "garbled"}, "'values' cannot be decoded"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_int8_payloads_are_rejected(case):
    changes, reason = MALFORMED[case]
    built = {}
    for key, change in changes.items():
        if change == "-128":
            built[key] = _codes_with_minus_128()
        elif change == "mislabelled":
            built[key] = _mislabelled_float_codes()
        elif change == "garbled":
            good = _int8_reply()[0]["values"]
            built[key] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=b"\x93NUMPY garbage")
        elif isinstance(change, str):
            built[key] = _scales_with(float(change))
        else:
            built[key] = change
    rec, layout, masks = _int8_reply(**built)
    with pytest.raises(ReplyError, match=reason):
        transport.read_payload(rec, layout, masks, "int8")


def test_a_float_payload_read_as_int8_and_back_is_rejected():
    layout, masks, values, dense = cnn_payload_parts()
    with pytest.raises(ReplyError, match="lacks values-scale, dense-scale"):
        transport.read_payload(transport.make_payload(values, dense, "float16"), layout, masks, "int8")
    with pytest.raises(ReplyError, match="unexpected arrays"):
        transport.read_payload(transport.make_payload(values, dense, "int8"), layout, masks, "float16")


@pytest.mark.slow
def test_ssfl_learns_as_well_in_int8_as_in_float32(tmp_path):
    """SSFL on digits (10 clients, Dirichlet 0.5, 8 rounds, 90% sparsity), seed 1: int8 replies and model within 2
    points of float32 at a quarter of the bytes. Seeds 1-3 measured: float32 75.21 / 81.13 / 84.79 %, int8 74.65 /
    81.13 / 84.79 % (nearest rounding; seeded stochastic rounding of the replies gave 74.08 / 79.72 / 83.38 %)."""
    from tests.conftest import LEARNING, fedsparse_run, summary

    settings = (*LEARNING, "num-clients=10", "partitioner=dirichlet", "dirichlet-alpha=0.5", "num-rounds=8",
                "strategy=ssfl", "sparse.sparsity=0.9", "seed=1")
    results = {}
    for dtype in ("float32", "int8"):
        fedsparse_run(tmp_path / dtype, *settings, f"sparse.value-dtype={dtype}")
        results[dtype] = summary(tmp_path / dtype)
    assert results["int8"]["final_accuracy"] > 0.6  # chance is 0.1
    assert results["int8"]["final_accuracy"] >= results["float32"]["final_accuracy"] - 0.02
    assert results["int8"]["bytes_up"] < 0.3 * results["float32"]["bytes_up"]


def test_a_mask_strategy_sends_and_aggregates_int8(task_identity):
    """Through a strategy's own hooks (tests.test_strategies' fake grid): the model goes down in int8 with its scales
    and `value-dtype` int8 in the config; int8 updates of 2x and 4x the model (5 and 15 examples) move it by about
    3.5x, within the rounding of the sent model and of the updates; a reply with a zero scale is rejected and the
    round goes on with the other."""
    from tests.test_strategies import aggregate, client_reply, make_strategy, reasons

    strategy, state = make_strategy("random", nodes=(1, 2, 3), **{"sparse.value-dtype": "int8", "sparsity": 0.9})
    down = strategy.plans[1].messages[0].content
    assert down["config"]["value-dtype"] == "int8" and sorted(down["arrays"]) == sorted(transport.payload_keys("int8"))
    replies = [client_reply(strategy, state, 1, 5, 2.0, "int8"), client_reply(strategy, state, 2, 15, 4.0, "int8"),
               client_reply(strategy, state, 3, 10, 3.0, "int8")]
    replies[2].content["arrays"]["dense-scale"] = Array(np.zeros(1, dtype=np.float32))
    new, metrics = aggregate(strategy, replies)
    assert metrics["accepted"] == 2 and "'dense-scale'" in reasons(strategy)
    n_values, n_dense = sparse.num_values(strategy.layout, strategy.masks)
    assert metrics["logical_up"] == 2 * transport.logical_payload_bytes(strategy.layout, strategy.masks, "int8")
    assert metrics["logical_up"] == 2 * (n_values + n_dense + 4 * (math.ceil(n_values / 256) +
                                                                    math.ceil(n_dense / 256)))
    values, dense = sparse.gather(state, strategy.layout, strategy.masks)
    got_values, got_dense = sparse.gather(new, strategy.layout, strategy.masks)
    for sent, got in ((values, got_values), (dense, got_dense)):
        # each update (1x and 3x the model) is off by at most half its block's scale: <= 3 x peak / 254 per value
        bound = block_scales_per_value(quantize_int8(3 * sent)) * 0.5 + 1e-6
        assert bool(((got - 3.5 * sent).abs() <= bound).all())
