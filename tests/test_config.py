import tomllib

import pytest

from fedsparse.cli import main as cli_main
from fedsparse.config import SCHEMA, ConfigError, parse_assignments, resolve
from tests.conftest import REPO


def test_pyproject_lists_every_key_with_the_schema_default():
    app_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == set(SCHEMA)
    assert resolve(app_config) == resolve({})


@pytest.mark.parametrize("key,value,words", [
    ("strategy", "fedprox", "strategy"),
    ("sparsity", 1.0, "sparsity"),
    ("sparsity", -0.1, "sparsity"),
    ("num-clients", 0, "num-clients"),
    ("dirichlet-alpha", 0, "dirichlet-alpha"),
    ("lr", "fast", "lr"),
    ("value-dtype", "int4", "value-dtype"),
    ("mask-layers", "conv,norm", "mask-layers"),
    ("resume", "maybe", "resume"),
])
def test_invalid_value_names_the_key(key, value, words):
    with pytest.raises(ConfigError, match=words):
        resolve({key: value})


def test_unknown_key_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown config key 'num-round'.*num-rounds"):
        resolve({"num-round": 3})


def test_strings_from_the_command_line_are_parsed():
    cfg = resolve(parse_assignments(["num-clients=7", "lr=0.5", "resume=true", "dataset=digits"]))
    assert (cfg["num-clients"], cfg["lr"], cfg["resume"], cfg["dataset"]) == (7, 0.5, True, "digits")
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignments(["lr"])


def test_fraction_that_samples_nobody_is_refused():
    with pytest.raises(ConfigError, match="fraction-train"):
        resolve({"num-clients": 4, "fraction-train": 0.1})


def test_cli_fails_before_training_naming_the_key(capsys, tmp_path):
    assert cli_main(["run", "--set", "sparsity=1.5", "--out", str(tmp_path / "x")]) == 2
    assert "sparsity" in capsys.readouterr().err
    assert cli_main(["run", "--set", "bogus=1", "--out", str(tmp_path / "y")]) == 2
    assert "bogus" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing started


def test_cli_refuses_a_mask_that_must_leave_a_layer_empty(capsys, tmp_path):
    # digits/mlp has 3 maskable tensors and 54k weights: density 1e-5 keeps 1 weight, fewer than the tensors
    code = cli_main(["run", "--set", "dataset=digits", "model=mlp", "strategy=ssfl", "sparsity=0.99999",
                     "--out", str(tmp_path / "z")])
    assert code == 2
    assert "sparsity" in capsys.readouterr().err


def test_gpu_request_without_a_gpu_is_a_clear_error(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli_main(["run", "--set", "dataset=digits", "client-num-gpus=0.5", "--out", str(tmp_path / "g")]) == 2
    assert "client-num-gpus" in capsys.readouterr().err


def test_presets_are_valid_configs():
    for path in (REPO / "simulations" / "presets").glob("*.toml"):
        resolve(tomllib.loads(path.read_text()))


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = ".venv/bin/pip install -q -e '.[dev]' && .venv/bin/python -m pytest -q"
    assert command in readme and command in ci
