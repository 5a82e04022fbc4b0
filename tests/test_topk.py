"""Tests for fedsparse.topk: selection and error-feedback conservation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedsparse.topk import compress, topk_indices

SETTINGS = settings(max_examples=200, deadline=None)

arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=10),
    elements=st.floats(-100, 100, width=32),
)


@SETTINGS
@given(x=arrays, density=st.floats(1e-3, 1.0))
def test_topk_picks_the_largest_magnitudes(x, density):
    idx = topk_indices(x, density)
    k = max(1, round(density * x.size))
    assert idx.dtype == np.int64 and idx.size == k
    assert np.all(np.diff(idx) > 0)
    mag = np.abs(x.reshape(-1))
    rest = np.delete(mag, idx)
    assert rest.size == 0 or mag[idx].min() >= rest.max()


def test_topk_ties_go_to_lowest_indices():
    x = np.array([1.0, -3.0, 2.0, 2.0, -2.0, 2.0])
    assert topk_indices(x, 0.5).tolist() == [1, 2, 3]
    assert topk_indices(np.ones(10), 0.3).tolist() == [0, 1, 2]


def test_topk_keeps_at_least_one_entry():
    assert topk_indices(np.arange(1000.0), 1e-9).tolist() == [999]
    assert topk_indices(np.zeros(0), 0.5).size == 0


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_density_raises(density):
    with pytest.raises(ValueError, match="density"):
        topk_indices(np.ones(4), density)
    with pytest.raises(ValueError, match="density"):
        compress(np.ones(4), None, density)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        compress(np.ones(4), np.zeros(5), 0.5)
    with pytest.raises(ValueError, match="finite"):
        compress(np.array([1.0, np.nan]), None, 0.5)
    with pytest.raises(ValueError, match="float"):
        compress(np.ones(4, dtype=np.int64), None, 0.5)


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    density=st.floats(0.01, 1.0),
    rounds=st.integers(1, 8),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=20),
)
def test_error_feedback_conserves_the_update_sum(seed, density, rounds, shape):
    rng = np.random.default_rng(seed)
    updates = [rng.standard_normal(shape) for _ in range(rounds)]
    sent = np.zeros(int(np.prod(shape)))
    residual = None
    for update in updates:
        corrected = update if residual is None else update + residual
        idx, values, residual = compress(update, residual, density)
        assert residual.shape == update.shape
        # sent + new residual is the corrected update bit for bit; what was sent is zero in the residual
        np.testing.assert_array_equal(residual.reshape(-1)[idx], 0.0)
        rebuilt = residual.reshape(-1).copy()
        rebuilt[idx] = values
        np.testing.assert_array_equal(rebuilt, corrected.reshape(-1))
        sent[idx] += values
    total = np.sum(updates, axis=0).reshape(-1)
    np.testing.assert_allclose(sent + residual.reshape(-1), total, rtol=1e-12, atol=1e-12)


def test_compress_does_not_modify_its_inputs():
    update, residual = np.array([3.0, 1.0, -2.0]), np.array([0.5, 0.0, 0.0])
    compress(update, residual, 0.34)
    assert update.tolist() == [3.0, 1.0, -2.0] and residual.tolist() == [0.5, 0.0, 0.0]
    compress(update, None, 0.34)
    assert update.tolist() == [3.0, 1.0, -2.0]


def test_small_coordinate_is_sent_once_its_residual_grows():
    residual, sent = None, []
    for _ in range(4):  # density 0.5: one of two entries per round
        idx, values, residual = compress(np.array([1.0, 0.3]), residual, 0.5)
        sent.append((idx, values))
    assert [idx.tolist() for idx, _ in sent] == [[0], [0], [0], [1]]
    assert sent[3][1][0] == pytest.approx(1.2)
    np.testing.assert_allclose(residual, [1.0, 0.0])
