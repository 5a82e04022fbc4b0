import tomllib

import pytest

from fedsparse.cli import main as cli_main
from fedsparse.config import SCHEMA, ConfigError, flatten, parse_assignments, resolve
from tests.conftest import REPO


def test_pyproject_lists_every_key_with_the_schema_default():
    app_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(flatten(app_config)) == set(SCHEMA)
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


# ------------------------------------------------------------------ settings that used to pass and then fail

FLOAT_KEYS = sorted(name for name, key in SCHEMA.items() if key.type is float)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "inf", "nan"])
def test_every_float_key_refuses_non_finite_values(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'.*finite"):
        resolve({key: value})


@pytest.mark.parametrize("value", [1e20, -1, 2**32, "-5"])
def test_seed_out_of_range_names_seed(value):
    with pytest.raises(ConfigError, match="'seed'"):
        resolve({"seed": value})


def test_seed_range_ends_are_valid():
    assert resolve({"seed": 0})["seed"] == 0
    assert resolve({"seed": 2**32 - 1})["seed"] == 2**32 - 1


def test_min_clients_above_num_clients_is_refused():
    assert resolve({"num-clients": 5, "min-clients": 5})["min-clients"] == 5
    with pytest.raises(ConfigError, match="'min-clients'.*num-clients 5"):
        resolve({"num-clients": 5, "min-clients": 6})


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_output_dir_is_refused(value):
    with pytest.raises(ConfigError, match="'output-dir'"):
        resolve({"output-dir": value})


def test_mask_layers_with_spaces_are_normalised():
    assert resolve({"sparse.mask-layers": " conv , linear"})["sparse.mask-layers"] == "conv,linear"


def preflight_error(tmp_path, **settings) -> str:
    """The ConfigError preflight raises for digits with `settings` (hyphens spelled as underscores)."""
    from fedsparse.simulation import preflight

    overrides = {"dataset": "digits", "num-clients": 4, "output-dir": str(tmp_path / "out")}
    overrides.update({k.replace("_", "-"): v for k, v in settings.items()})
    with pytest.raises(ConfigError) as err:
        preflight(resolve(overrides))
    return str(err.value)


def test_preflight_names_shards_per_client_when_shards_would_be_empty(tmp_path):
    assert "'shards-per-client'" in preflight_error(tmp_path, partitioner="shard", shards_per_client=1000)
    assert not (tmp_path / "out").exists()  # output-dir is created last, after every other check


def test_preflight_names_classes_per_client_beyond_the_classes(tmp_path):
    assert "'classes-per-client'" in preflight_error(tmp_path, partitioner="pathological", classes_per_client=11)


def test_preflight_names_mask_layers_when_the_model_has_none(tmp_path):
    message = preflight_error(tmp_path, model="mlp", strategy="ssfl", mask_layers="conv")
    assert "'sparse.mask-layers'" in message and "mlp" in message


def test_preflight_names_device_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert "'device'" in preflight_error(tmp_path, device="cuda")


def test_preflight_names_an_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "'output-dir'" in preflight_error(tmp_path, output_dir=str(tmp_path / "file"))
    assert "'output-dir'" in preflight_error(tmp_path, output_dir=str(tmp_path / "file" / "below"))


def test_preflight_names_an_output_dir_it_cannot_write(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes everywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "'output-dir'" in preflight_error(tmp_path, output_dir=str(locked / "run"))
    finally:
        locked.chmod(0o700)


def test_cli_stops_a_bad_setting_before_ray(capsys, tmp_path, monkeypatch):
    import fedsparse.simulation

    def no_ray(*args, **kwargs):
        raise AssertionError("simulate() was called")

    monkeypatch.setattr(fedsparse.simulation, "simulate", no_ray)
    for setting, key in [("shards-per-client=1000", "shards-per-client"), ("lr=inf", "lr"), ("seed=1e20", "seed"),
                         ("seed=-1", "seed"), ("min-clients=5", "min-clients")]:
        code = cli_main(["run", "--set", "dataset=digits", "num-clients=4", "partitioner=shard", setting,
                         "--out", str(tmp_path / "o")])
        assert code == 2 and f"'{key}'" in capsys.readouterr().err, setting
