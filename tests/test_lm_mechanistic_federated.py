"""Federated mechanistic unlearning of facts: the lm-mechanistic experiment (`server.experiments.language_facts`)
and its client handlers (`client.language_facts`).

One tiny in-process run (`server.local_grid.LocalGrid`, 2 teaching rounds, 1 unlearning round) is shared by the
module; one slow test runs the preset through `fedsparse run` with real Ray.
"""

from __future__ import annotations

import math

import pytest
import torch

from client.language import build_lm
from client.language_facts import LOCALIZATIONS, MASK_MESSAGE, client_facts, localize
from client.unlearning import unpack_parameter_mask
from fedsparse.config import ConfigError, resolve
from fedsparse.lm.facts import relearn_split
from fedsparse.lm.mechanistic import all_components, components_mask, mask_count
from server.local_grid import LocalGrid
from tests.conftest import fedsparse_run, summary

pytestmark = pytest.mark.usefixtures("one_torch_thread", "task_identity")

TINY = {"block-size": 48, "layers": 2, "heads": 2, "embd": 16, "local-steps": 4, "eval-windows": 8,
        "sample-chars": 0}
FACTS = {"train-rounds": 2, "rounds": 1, "facts": 4, "unlearn-steps": 3, "relearn-steps": 2}


def _cfg(out, seed: int = 0, lm: dict | None = None, **lmf: object) -> dict:
    return resolve({"experiment": "lm-mechanistic", "num-clients": 3, "lr": 0.01, "grad-clip": 1.0,
                    "batch-size": 8, "seed": seed, "output-dir": str(out), "lm": {**TINY, **(lm or {})},
                    "lmf": {**FACTS, **lmf}})


class RecordingGrid(LocalGrid):
    """LocalGrid that keeps the model the mask request carries (the taught model at the start of phase 2)."""

    taught: dict[str, torch.Tensor] | None = None

    def deliver(self, message):
        if message.metadata.message_type == MASK_MESSAGE:
            self.taught = message.content["model"].to_torch_state_dict()
        return super().deliver(message)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from flwr.supercore.task_identity import TaskIdentity

    from server.loop import run_federation

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("lmf")
    cfg = _cfg(out, localization="lookup_mlps")
    grid = RecordingGrid(cfg)
    result = run_federation(grid, cfg)
    yield cfg, grid, result, out
    torch.set_num_threads(previous)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def test_each_localization_has_the_matched_parameter_count(tmp_path):
    cfg = _cfg(tmp_path)
    model = build_lm(cfg, seed=0)
    facts = client_facts(cfg, 0)
    one_mlp = mask_count(components_mask(model, [c for c in all_components(model) if c.kind == "mlp"][:1]))
    all_mlps = mask_count(components_mask(model, [c for c in all_components(model) if c.kind == "mlp"]))
    expected = {"lookup_mlps": one_mlp, "causal_tracing": one_mlp, "attribution_patching": one_mlp,
                "random": one_mlp, "all_mlps": all_mlps, "all_weights": model.num_parameters()}
    assert one_mlp == 16 * 64 + 64 + 64 * 16 + 16  # c_fc and c_proj of a 16-wide MLP, with biases
    for method in LOCALIZATIONS:
        found = localize(model, cfg, facts, method)
        assert found.name == method and found.parameter_count == expected[method], method
        assert set(found.mask) == {name for name, _ in model.named_parameters()}


def test_the_relearning_split_is_two_disjoint_halves_of_the_forgotten_facts(tmp_path, tiny_run):
    cfg, _, result, _ = tiny_run
    forgotten = client_facts(cfg, cfg["lmf.client"])
    split = relearn_split(forgotten, cfg["seed"])
    assert set(split.relearn).isdisjoint(split.heldout)
    assert sorted(split.relearn + split.heldout, key=str) == sorted(forgotten, key=str)
    assert len(split.relearn) == len(split.heldout) == 2 == result["relearn"]["heldout_facts"]
    assert all(len(v) == 3 for v in result["relearn"].values() if isinstance(v, list))


def test_outside_the_mask_every_parameter_is_bit_identical_after_phase_2(tiny_run):
    cfg, grid, result, out = tiny_run
    model = build_lm(cfg, seed=0)
    state = next(iter(grid.contexts.values())).state
    mask = unpack_parameter_mask(state["lmf-mask-bits"]["bits"].numpy(), model)
    final = torch.load(out / "final_model.pt")
    taught = grid.taught
    assert taught is not None and mask_count(mask) == result["mask"]["parameters"] > 0
    changed_inside = 0
    for name, param in model.named_parameters():
        inside = mask[name]
        assert torch.equal(final[name][~inside], taught[name][~inside]), name
        changed_inside += int((final[name][inside] != taught[name][inside]).sum())
    assert changed_inside > 0  # the unlearning round did train inside the mask


def test_the_mask_bytes_are_one_off_and_every_client_installed_the_same_mask(tiny_run):
    cfg, grid, result, _ = tiny_run
    bits = result["mask"]["packed_bytes"]
    assert bits == math.ceil(build_lm(cfg, seed=0).num_parameters() / 8)
    assert result["mask_bytes"]["up"] >= bits and result["mask_bytes"]["down"] >= 3 * bits
    mask_exchange = result["mask_bytes"]["down"] + result["mask_bytes"]["up"]
    assert mask_exchange <= result["bytes_oneoff"] < mask_exchange + bits  # plus the small discovery queries
    fingerprints = {str(c.state["lmf-mask-info"]["fingerprint"]) for c in grid.contexts.values()}
    assert len(fingerprints) == 1 and len(grid.contexts) == 3
    # the unlearning round carries the dense model both ways, as a teaching round (its config names the mask's
    # fingerprint: a few bytes more), not the mask (packed_bytes per client)
    assert abs(3 * result["unlearn_bytes"] - (result["bytes_down"] + result["bytes_up"])) < bits


@pytest.mark.parametrize(("settings", "key"), [
    ({"client": 3}, "lmf.client"),
    ({"lookup-layers": 3}, "lmf.lookup-layers"),
    ({"train-format": 3}, "lmf.train-format"),
    ({"localization": "neurons"}, "lmf.localization"),
])
def test_config_errors_name_the_key(tmp_path, settings, key):
    from fedsparse.simulation import check_run_settings

    with pytest.raises(ConfigError, match=f"'{key}'"):
        check_run_settings(_cfg(tmp_path, **settings))


def test_a_context_shorter_than_a_fact_line_names_lm_block_size(tmp_path):
    from fedsparse.simulation import check_run_settings

    with pytest.raises(ConfigError, match="'lm.block-size'"):
        check_run_settings(_cfg(tmp_path, lm={"block-size": 16}))


@pytest.mark.slow
def test_the_preset_runs_on_ray(tmp_path):
    fedsparse_run(tmp_path, "lmf.train-rounds=2", "lmf.rounds=1", "num-rounds=3", "lm.local-steps=5",
                  "lm.eval-windows=8", "lmf.unlearn-steps=3", "lmf.relearn-steps=3",
                  extra=("--preset", "lm-mechanistic"))
    result = summary(tmp_path)
    assert result["rounds"] == 3 and result["unlearn_rounds"] == 1 and result["mask"]["parameters"] > 0
    assert result["bytes_oneoff"] >= result["mask_bytes"]["down"] + result["mask_bytes"]["up"] > 0
