"""What a fresh ClientApp process imports (issue 13 §3: deployment starts one per message): importing
`client.client_app` imports no experiment module and none of scikit-learn, scipy, pandas, torchvision; a train
message's config, model and data come without importing them once the node's first message has prepared them;
the recorded config is the resolved one and a bad record is resolved again; and the lazy routing table
`client.handlers.HANDLER_MODULES` names, for every message type, the module that registers its handler."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client.handlers import EXAMPLE_BOUNDS, EXPERIMENT_MODULES, HANDLER_MODULES, HANDLERS
from fedsparse.config import resolve

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("sklearn", "scipy", "pandas", "torchvision", "datasets", "client.continual", "client.merging",
         "client.language", "client.language_facts", "client.language_unlearning", "client.unlearning",
         "client.unlearning_local", "client.connectivity", "client.transfer", "fedsparse.lm")
PROBE = """
import json, sys
import client.client_app
after_import = sorted(sys.modules)
from client.client_app import client_config
from client.handlers import local_data, model_and_layout
cfg = client_config({"dataset": "digits", "num-clients": 3, "output-dir": sys.argv[1]})
model_and_layout(cfg)
x, y = local_data(cfg, 0)
print(json.dumps({"after_import": after_import, "after_message": sorted(sys.modules), "examples": len(x)}))
"""


def _client_modules() -> list[str]:
    return sorted(f"client.{p.stem}" for p in (ROOT / "client").glob("*.py") if p.stem != "__init__")


def _loaded(modules: list[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def test_a_clientapp_process_imports_only_what_a_train_message_needs(tmp_path):
    from client.client_app import client_config
    from client.handlers import dataset_shape, local_data

    env = {**os.environ, "FEDSPARSE_CACHE": str(tmp_path / "cache")}
    os.environ["FEDSPARSE_CACHE"] = env["FEDSPARSE_CACHE"]
    try:  # prepare the partition and the dataset's shape, as the node's first message does
        cfg = client_config({"dataset": "digits", "num-clients": 3, "output-dir": str(tmp_path / "out")})
        assert cfg == resolve({"dataset": "digits", "num-clients": 3, "output-dir": str(tmp_path / "out")})
        dataset_shape(cfg)
        expected = len(local_data(cfg, 0)[0])
    finally:
        del os.environ["FEDSPARSE_CACHE"]
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "out")], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=300)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["examples"] == expected
    assert _loaded(probe["after_import"], "torch") and _loaded(probe["after_import"], "flwr")
    for stage in ("after_import", "after_message"):
        loaded = [name for name in HEAVY if _loaded(probe[stage], name)]
        assert loaded == [], f"{stage}: {loaded}"


def test_every_registered_handler_is_routed_to_the_module_that_registers_it():
    for module in _client_modules():
        importlib.import_module(module)
    registered = {message_type: fn.__module__ for message_type, fn in dict.items(HANDLERS)}
    assert registered == HANDLER_MODULES
    bounds = {experiment: fn.__module__ for experiment, fn in EXAMPLE_BOUNDS.items()}
    assert bounds == EXPERIMENT_MODULES


def test_a_handler_lookup_imports_its_module_in_a_fresh_process():
    code = ("import sys; from client.handlers import HANDLERS; assert 'client.merging' not in sys.modules; "
            "fn = HANDLERS['train.merge']; print(fn.__module__, 'client.merging' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.split() == ["client.merging", "True"]


def test_an_unknown_message_type_is_a_key_error():
    with pytest.raises(KeyError, match="no handler"):
        HANDLERS["train.no_such_action"]


def test_the_recorded_client_config_is_the_resolved_one_and_a_bad_record_is_ignored(tmp_path, monkeypatch):
    from client.client_app import _config_record_path, client_config

    monkeypatch.setenv("FEDSPARSE_CACHE", str(tmp_path / "cache"))
    run_config = {"strategy": "ssfl", "dataset": "digits", "num-clients": 3, "sparse.sparsity": 0.8, "lr": 0.1,
                  "output-dir": str(tmp_path / "out")}
    expected = resolve(run_config)
    assert client_config(run_config) == expected  # resolved and recorded
    path, _ = _config_record_path(run_config)
    assert json.loads(path.read_text())["cfg"] == expected
    assert client_config(run_config) == expected  # read back
    other = {**run_config, "lr": 0.2}
    assert _config_record_path(other)[0] != path and client_config(other)["lr"] == 0.2
    record = json.loads(path.read_text())
    for damage in ({**record, "key": "0" * 64}, {**record, "cfg": {**record["cfg"], "lr": "0.1"}},
                   {**record, "cfg": {k: v for k, v in record["cfg"].items() if k != "seed"}}):
        path.write_text(json.dumps({**damage, "cfg": {**damage["cfg"], "seed": 999}} if "seed" in damage["cfg"]
                                   else damage))
        assert client_config(run_config) == expected
    path.write_text("{broken")
    assert client_config(run_config) == expected
