"""What `fedsparse run` does so one machine goes further: the app's pyproject.toml parsed once per run rather than
once per virtual node, and attaching to an existing Ray cluster (RAY_ADDRESS) instead of starting one."""

from __future__ import annotations

from pathlib import Path

from flwr.compat.client import run_info_store
from flwr.compat.client.run_info_store import DeprecatedRunInfoStore

from fedsparse.simulation import APP_DIR, app_config_parsed_once, ray_init_args


def test_the_app_config_is_parsed_once_for_all_virtual_nodes(monkeypatch):
    """Flower registers each node's context through get_fused_config_from_dir; inside the context manager 50 nodes
    cost one parse, each node gets an equal config of its own, and the original function is back afterwards."""
    calls = []
    original = run_info_store.get_fused_config_from_dir

    def counting(app_path: Path, override_config: dict) -> dict:
        calls.append(app_path)
        return original(app_path, override_config)

    monkeypatch.setattr(run_info_store, "get_fused_config_from_dir", counting)
    stores = [DeprecatedRunInfoStore(node_id=n, node_config={"partition-id": n}) for n in range(50)]
    with app_config_parsed_once():
        for store in stores:
            store.register_context(run_id=1, app_dir=str(APP_DIR))
    assert len(calls) == 1 and run_info_store.get_fused_config_from_dir is counting
    configs = [store.retrieve_context(1).run_config for store in stores]
    assert all(c == configs[0] for c in configs) and len({id(c) for c in configs}) == 50
    assert configs[0]["num-clients"] == original(APP_DIR, {})["num-clients"]


def test_ray_address_attaches_without_resources(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ray_init_args(2) == {"address": "10.0.0.5:6379", "logging_level": "error"}


def test_without_ray_address_a_local_instance_of_the_asked_cpus(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ray_init_args(2)
    assert args["address"] == "local" and args["num_cpus"] == 2 and args["include_dashboard"] is False
