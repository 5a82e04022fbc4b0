"""`fedsparse run` on an existing Ray cluster: with RAY_ADDRESS set, Flower's Ray backend gets an init_args that
attaches to it (Ray refuses num_cpus when attaching); without, a local instance of its own (address "local", so a
`ray start` cluster on the same machine is never joined by accident)."""

from __future__ import annotations

from fedsparse.simulation import ray_init_args


def test_ray_address_attaches_without_resources(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ray_init_args(2) == {"address": "10.0.0.5:6379", "logging_level": "error"}


def test_without_ray_address_a_local_instance_of_the_asked_cpus(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ray_init_args(2)
    assert args["address"] == "local" and args["num_cpus"] == 2 and args["include_dashboard"] is False
