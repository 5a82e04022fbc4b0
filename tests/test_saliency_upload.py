"""SSFL's cheaper saliency upload (`sparse.saliency-dtype`, `sparse.saliency-topk`): the client encoder
(`client.handlers.saliency_upload`) and the server decoder (`SSFL.decode_scores`) through `SSFL.make_mask`.

Invariants checked: the defaults send the same config and the same float32 array as before and give the exact
hand-computed top-k mask; float16 scores give a mask close to the float32 one (IoU bound); a top-k upload of every
score gives the dense mask bit for bit; upload bytes follow the formula; malformed sparse replies are rejected and
logged while the mask is still built from the others."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.handlers import saliency_upload
from fedsparse import codec, transport
from fedsparse.replies import NodeInfo
from tests.conftest import reply_to
from tests.test_masks import brute_force_topk, flat_mask
from tests.test_strategies import FakeGrid, bound

NODES = {0: 1, 1: 2, 2: 3}
EXAMPLES = {1: 10, 2: 30, 3: 60}
RECORD_OVERHEAD = 136  # Flower's count_bytes() of a one-Array ArrayRecord beyond the array's bytes (npy header)


def client_scores(n: int, seed: int = 0) -> dict[int, np.ndarray]:
    """Per node: non-negative float32 scores with a heavy tail, as |w * grad| looks, and no ties."""
    rng = np.random.default_rng(seed)
    return {node: (rng.lognormal(0.0, 2.0, n) * 1e-3).astype(np.float32) for node in NODES.values()}


def honest_answer(scores: dict[int, np.ndarray], sent_configs: list | None = None):
    """A FakeGrid answer: each node encodes its scores as the client handler does for the query it was sent."""
    def answer(messages):
        out = []
        for m in messages:
            node, config = m.metadata.dst_node_id, m.content["config"]
            if sent_configs is not None:
                sent_configs.append(config)
            upload = saliency_upload(torch.from_numpy(scores[node]), config)
            out.append(reply_to(RecordDict({"scores": ArrayRecord({"saliency": Array(upload)}),
                                            "metrics": MetricRecord({"num-examples": EXAMPLES[node],
                                                                     "partition-id": node - 1})}),
                                node, "query.saliency"))
        return out
    return answer


def ssfl_mask(scores, sparsity=0.9, answer=None, **overrides):
    """(flat mask, strategy) of SSFL on the digits cnn with these per-node scores."""
    strategy, state = bound("ssfl", sparsity=sparsity, **overrides)
    strategy.roster.known = {node: NodeInfo(node - 1, EXAMPLES[node]) for node in NODES.values()}
    masks = strategy.make_mask(FakeGrid(answer=answer or honest_answer(scores)), NODES, state)
    return flat_mask(masks, strategy.layout.maskable), strategy


def weighted(scores: dict[int, np.ndarray]) -> np.ndarray:
    total = sum(EXAMPLES.values())
    return sum(EXAMPLES[node] * s.astype(np.float64) for node, s in scores.items()) / total


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_defaults_send_the_old_config_and_float32_array_and_give_the_exact_mask(task_identity):
    strategy, _ = bound("ssfl")
    n = strategy.layout.num_maskable
    scores = client_scores(n)
    configs: list = []
    mask, strategy = ssfl_mask(scores, answer=honest_answer(scores, configs))
    assert all(set(c.keys()) == set(strategy.train_config(0).keys()) for c in configs)  # no new config entries
    for s in scores.values():  # the array the handler sent before this option existed
        upload = saliency_upload(torch.from_numpy(s), ConfigRecord())
        assert upload.dtype == np.float32 and upload.tobytes() == s.astype(np.float32).tobytes()
    expected = brute_force_topk(weighted(scores).astype(np.float32), round(0.1 * n))
    assert np.array_equal(mask, expected) and strategy.failures.records == []


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_scores_give_a_mask_close_to_the_float32_one(task_identity, seed, dtype):
    n = bound("ssfl")[0].layout.num_maskable
    scores = client_scores(n, seed)
    exact, _ = ssfl_mask(scores)
    half, strategy = ssfl_mask(scores, **{"sparse.saliency-dtype": dtype})
    assert strategy.failures.records == []
    overlap = iou(exact, half)
    # float16 keeps 11 significant bits, bfloat16 8: only near-ties at the threshold can swap
    assert overlap >= (0.995 if dtype == "float16" else 0.99), overlap
    assert half.sum() == exact.sum()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_topk_of_everything_equals_the_dense_mask_exactly(task_identity, dtype):
    n = bound("ssfl")[0].layout.num_maskable
    scores = client_scores(n, 3)
    dense, _ = ssfl_mask(scores, **{"sparse.saliency-dtype": dtype})
    sparse_all, strategy = ssfl_mask(scores, **{"sparse.saliency-dtype": dtype, "sparse.saliency-topk": 1000.0})
    assert strategy.saliency_keep == n and strategy.failures.records == []
    assert np.array_equal(dense, sparse_all)


def test_topk_upload_keeps_each_clients_top_scores_and_missing_count_as_zero(task_identity):
    n = bound("ssfl")[0].layout.num_maskable
    scores = client_scores(n, 4)
    mask, strategy = ssfl_mask(scores, **{"sparse.saliency-topk": 2.0})
    keep = math.ceil(2.0 * round(0.1 * n))
    assert strategy.saliency_keep == keep
    truncated = {}
    for node, s in scores.items():
        kept = np.zeros(n, dtype=np.float32)
        top = np.argsort(-s, kind="stable")[:keep]
        kept[top] = s[top]
        truncated[node] = kept
    assert np.array_equal(mask, brute_force_topk(weighted(truncated).astype(np.float32), round(0.1 * n)))


@pytest.mark.parametrize("dtype,topk", [("float32", 0.0), ("float16", 0.0), ("bfloat16", 0.0), ("float32", 1.0),
                                        ("float16", 4.0)])
def test_upload_bytes_follow_the_formula(task_identity, dtype, topk):
    strategy, _ = bound("ssfl", **{"sparse.saliency-dtype": dtype, "sparse.saliency-topk": topk})
    n = strategy.layout.num_maskable
    flat = torch.from_numpy(client_scores(n, 5)[1])
    config = ConfigRecord({"saliency-dtype": dtype, "saliency-keep": strategy.saliency_keep})
    record_bytes = ArrayRecord({"saliency": Array(saliency_upload(flat, config))}).count_bytes()
    itemsize = 4 if dtype == "float32" else 2
    if topk == 0.0:
        assert record_bytes == RECORD_OVERHEAD + itemsize * n
    else:
        keep = math.ceil(topk * round(0.1 * n))
        values_bytes = itemsize * keep
        # the codec's cheaper index layout: at most a bitmap (n bits) plus a header of at most 40 bytes
        assert RECORD_OVERHEAD + values_bytes < record_bytes <= RECORD_OVERHEAD + values_bytes + math.ceil(n / 8) + 40
        assert record_bytes < RECORD_OVERHEAD + itemsize * n


def sparse_reply(node: int, upload: np.ndarray):
    return reply_to(RecordDict({"scores": ArrayRecord({"saliency": Array(upload)}),
                                "metrics": MetricRecord({"num-examples": EXAMPLES[node], "partition-id": node - 1})}),
                    node, "query.saliency")


@pytest.mark.parametrize("breakage,reason", [
    ("dense-float32", "1-d uint8 codec buffer"),
    ("truncated", "cannot be decoded"),
    ("too-many", "at most"),
    ("wrong-length", "shape"),
    ("negative", "non-negative"),
    ("nan", "finite"),
])
def test_malformed_sparse_scores_are_rejected_and_logged_and_the_mask_still_built(task_identity, breakage, reason):
    strategy, _ = bound("ssfl", **{"sparse.saliency-topk": 1.0})
    n, keep = strategy.layout.num_maskable, strategy.saliency_keep
    scores = client_scores(n, 6)
    good = honest_answer(scores)

    def answer(messages):
        replies = good([m for m in messages if m.metadata.dst_node_id != 1])
        s = scores[1].copy()
        top = np.sort(np.argsort(-s, kind="stable")[:keep])
        if breakage == "dense-float32":
            bad = s
        elif breakage == "truncated":
            bad = np.frombuffer(codec.encode_sparse(n, top, s[top]), dtype=np.uint8)[:-3].copy()
        elif breakage == "too-many":
            more = np.sort(np.argsort(-s, kind="stable")[:keep + 1])
            bad = np.frombuffer(codec.encode_sparse(n, more, s[more]), dtype=np.uint8).copy()
        elif breakage == "wrong-length":
            bad = np.frombuffer(codec.encode_sparse(n + 1, top, s[top]), dtype=np.uint8).copy()
        else:
            values = s[top].copy()
            values[0] = -1.0 if breakage == "negative" else np.nan
            bad = np.frombuffer(codec.encode_sparse(n, top, values), dtype=np.uint8).copy()
        return replies + [sparse_reply(1, bad)]

    mask, strategy = ssfl_mask(scores, answer=answer, **{"sparse.saliency-topk": 1.0})
    assert len(strategy.failures.records) == 1 and reason in strategy.failures.records[0]["reason"]
    assert mask.sum() == round(0.1 * n)  # built from the two valid replies


def test_bad_saliency_arguments_raise_value_error():
    from server.strategies.ssfl import SSFL

    with pytest.raises(ValueError, match="saliency_dtype"):
        SSFL(maskable=("w",), saliency_dtype="int8")
    with pytest.raises(ValueError, match="saliency_topk"):
        SSFL(maskable=("w",), saliency_topk=-1.0)
    assert transport.to_wire(torch.ones(2), "float16").dtype == np.float16
