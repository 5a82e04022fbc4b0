import tomllib

import pytest

from fedsparse.cli import main as cli_main
from fedsparse.config import SCHEMA, ConfigError, flatten, parse_assignments, resolve
from server.strategies import STRATEGIES
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


# ------------------------------------------------------------------ registries and the keys a run uses

# A value other than the default, for every sparse.* key.
OFF_DEFAULT = {"sparse.sparsity": 0.5, "sparse.mask-scope": "layerwise", "sparse.mask-layers": "conv",
               "sparse.saliency-fraction": 0.5, "sparse.saliency-batches": 2, "sparse.saliency-aggregation": "mean",
               "sparse.saliency-dtype": "bfloat16", "sparse.saliency-topk": 2.0,
               "sparse.saliency-init": "rebuild",
               "sparse.value-dtype": "float16", "sparse.warmup-rounds": 2, "sparse.topk-density": 0.2}


@pytest.fixture
def strategy_keys() -> dict[str, frozenset[str]]:
    """{strategy: the namespaced keys it reads}: the registered classes' `config_keys`."""
    return {name: cls.config_keys for name, cls in STRATEGIES.items()}


def test_every_sparse_key_has_an_off_default_value():
    assert set(OFF_DEFAULT) == {name for name in SCHEMA if name.startswith("sparse.")}
    assert all(SCHEMA[name].default != value for name, value in OFF_DEFAULT.items())


def test_strategy_choices_are_the_registry_names():
    assert SCHEMA["strategy"].allowed() == tuple(STRATEGIES)
    with pytest.raises(ConfigError, match="'strategy': 'fedprox' is not one of " + ", ".join(STRATEGIES)):
        resolve({"strategy": "fedprox"})


def test_model_choices_are_the_registry_names():
    from fedsparse.models import MODELS

    assert SCHEMA["model"].allowed() == tuple(MODELS)
    with pytest.raises(ConfigError, match="'model': 'vgg' is not one of " + ", ".join(MODELS)):
        resolve({"model": "vgg"})


def test_experiment_defaults_to_standard_and_takes_only_registry_names():
    from fedsparse.config import EXPERIMENT_REGISTRY, registry

    assert resolve({})["experiment"] == "standard"
    experiments = registry(EXPERIMENT_REGISTRY)
    names = ("standard",) if experiments is None else tuple(experiments)  # before server.experiments exists
    assert "standard" in names and SCHEMA["experiment"].allowed() == names
    with pytest.raises(ConfigError, match="'experiment': 'bogus' is not one of " + ", ".join(names)):
        resolve({"experiment": "bogus"})


def test_a_missing_registry_module_is_none_but_a_broken_one_raises(tmp_path, monkeypatch):
    from fedsparse.config import registry

    assert registry("no_such_module_here.sub:THING") is None
    (tmp_path / "broken_registry_mod.py").write_text("import no_such_dependency_here\nTHING = {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_here"):
        registry("broken_registry_mod:THING")
    (tmp_path / "registry_folder_without_init").mkdir()  # a package being written: no __init__.py yet
    assert registry("registry_folder_without_init:THING") is None


@pytest.mark.parametrize("key", sorted(OFF_DEFAULT))
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_sparse_key_off_its_default_must_be_used_by_the_strategy(strategy_keys, strategy, key):
    overrides = {"strategy": strategy, key: OFF_DEFAULT[key]}
    if key in strategy_keys[strategy]:
        assert resolve(overrides)[key] == OFF_DEFAULT[key]
        return
    users = [name for name, keys in strategy_keys.items() if key in keys]
    with pytest.raises(ConfigError) as err:
        resolve(overrides)
    message = str(err.value)
    assert f"config key '{key}'" in message and f"strategy {strategy}" in message
    assert f"strategies that use it: {', '.join(users)}" in message


def test_the_design_facts_about_which_strategy_reads_what(strategy_keys):
    assert "sparse.value-dtype" not in strategy_keys["fedavg"]
    assert not {"sparse.sparsity", "sparse.topk-density"} & strategy_keys["fedavg"]
    assert {"sparse.sparsity", "sparse.value-dtype", "sparse.saliency-batches"} <= strategy_keys["ssfl"]
    assert "sparse.topk-density" in strategy_keys["topk"] and "sparse.sparsity" not in strategy_keys["topk"]
    assert "sparse.warmup-rounds" in strategy_keys["magnitude"]
    assert "sparse.saliency-batches" not in strategy_keys["random"]


def test_a_key_at_its_default_is_fine_whatever_the_strategy(strategy_keys):
    # presets and commands may spell out a default; only a value the run would ignore is an error
    assert resolve({"strategy": "fedavg", "sparse.value-dtype": "float32", "sparsity": 0.9})["strategy"] == "fedavg"


def test_an_old_flat_name_is_named_as_given(strategy_keys):
    with pytest.raises(ConfigError, match=r"'sparse.value-dtype' \(given as 'value-dtype'\) is set to 'float16', "
                                          r"but strategy fedavg"):
        resolve({"value-dtype": "float16"})
    with pytest.raises(ConfigError, match=r"'sparse.topk-density' \(given as 'topk-density'\).*strategy ssfl"):
        resolve({"strategy": "ssfl", "topk-density": 0.3})


def test_flwr_run_config_with_every_default_is_checked_by_value(strategy_keys):
    """`flwr run` passes every key of pyproject.toml (defaults included), Flower-style: nested tables flattened."""
    app_config = flatten(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert resolve(app_config)["strategy"] == "fedavg"
    with pytest.raises(ConfigError, match="'sparse.value-dtype' is set to 'float16', but strategy fedavg"):
        resolve({**app_config, "sparse.value-dtype": "float16"})
    assert resolve({**app_config, "strategy": "ssfl", "sparse.value-dtype": "float16"})["sparse.value-dtype"] == \
        "float16"


def test_a_namespace_the_experiment_reads_is_allowed_and_named_otherwise(strategy_keys, monkeypatch):
    """An experiment's `config_namespaces` admits its keys; another experiment's keys are refused, naming it."""
    from fedsparse import config

    class Standard:
        config_namespaces = frozenset()

    class Continual:
        config_namespaces = frozenset({"cl"})

    fakes = {config.EXPERIMENT_REGISTRY: {"standard": Standard, "continual": Continual},
             config.STRATEGY_REGISTRY: STRATEGIES}
    monkeypatch.setattr(config, "registry", fakes.get)
    monkeypatch.setitem(SCHEMA, "cl.test-beta", config.Key(float, 0.5, "a test-only continual key"))
    assert resolve({"experiment": "continual", "cl.test-beta": 0.25})["cl.test-beta"] == 0.25
    assert resolve({"experiment": "standard", "cl": {"test-beta": 0.5}})["cl.test-beta"] == 0.5  # the default
    with pytest.raises(ConfigError, match="'cl.test-beta' is set to 0.25, but strategy fedavg with experiment "
                                          "standard does not use it \\(experiments that use it: continual\\)"):
        resolve({"cl": {"test-beta": 0.25}})


def test_cli_refuses_a_key_the_strategy_ignores_before_ray(strategy_keys, capsys, tmp_path, monkeypatch):
    import fedsparse.simulation

    def no_ray(*args, **kwargs):
        raise AssertionError("simulate() was called")

    monkeypatch.setattr(fedsparse.simulation, "simulate", no_ray)
    code = cli_main(["run", "--set", "dataset=digits", "value-dtype=float16", "--out", str(tmp_path / "o")])
    assert code == 2 and "'sparse.value-dtype' (given as 'value-dtype')" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_continual_keys_belong_to_the_continual_experiment():
    """The registered experiments: `cl.*` is read by `continual` only; `standard` refuses it by name."""
    assert resolve({"experiment": "continual", "cl.sfa-beta": 0.5})["cl.sfa-beta"] == 0.5
    with pytest.raises(ConfigError, match="'cl.sfa-beta' is set to 0.5, but strategy fedavg with experiment "
                                          "standard does not use it \\(experiments that use it: continual\\)"):
        resolve({"cl.sfa-beta": 0.5})
