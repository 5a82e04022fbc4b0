"""Resume: damaged run folders and refused changes fail before Ray starts, naming the file or the key; a copied
run folder resumes; resume may extend num-rounds (one real two-part run)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

import fedsparse.simulation
from fedsparse.cli import build_config
from fedsparse.cli import main as cli_main
from fedsparse.config import ConfigError, resolve
from fedsparse.resume import CHECKPOINT_FILE, CONFIG_FILE, ResumeError, load_for_resume
from fedsparse.simulation import preflight
from tests.conftest import fedsparse_run

SETTINGS = {"dataset": "digits", "num-clients": 3, "num-rounds": 2, "partitioner": "iid", "strategy": "ssfl",
            "sparsity": 0.8}


def make_run_folder(folder: Path, rounds_done: int = 2, **checkpoint_settings) -> dict:
    """A run folder as `fedsparse run` leaves it after `rounds_done` rounds (a stand-in model state)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = resolve({**SETTINGS, "output-dir": str(folder)})
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    checkpoint = {"config": {**cfg, **checkpoint_settings}, "state": {"w": torch.zeros(2)},
                  "rows": [{"round": r + 1} for r in range(rounds_done)], "failures": [],
                  "oneoff": {"down": 1, "up": 2, "logical_down": 1, "logical_up": 2}, "strategy": {}}
    torch.save(checkpoint, folder / CHECKPOINT_FILE)
    return cfg


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything gets as far as starting the simulation."""
    def refuse(*args, **kwargs):
        raise AssertionError("simulate() was called: the check did not happen before start")

    monkeypatch.setattr(fedsparse.simulation, "simulate", refuse)


def resume_cli(folder: Path, *settings: str) -> int:
    return cli_main(["run", "--resume", str(folder), *(["--set", *settings] if settings else [])])


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "a list", "missing entries", "wrong type"])
def test_damaged_checkpoint_is_named_before_start(tmp_path, capsys, no_ray, damage):
    folder = tmp_path / "run"
    make_run_folder(folder)
    path = folder / CHECKPOINT_FILE
    whole = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(whole[: len(whole) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint\xff" * 50)
    elif damage == "a list":
        torch.save([1, 2, 3], path)
    elif damage == "missing entries":
        torch.save({"config": {}, "state": {}}, path)
    else:
        checkpoint = torch.load(path, weights_only=False)
        torch.save({**checkpoint, "rows": "2 rounds"}, path)
    assert resume_cli(folder) == 2
    err = capsys.readouterr().err
    assert str(path) in err, err
    with pytest.raises(ResumeError, match=CHECKPOINT_FILE):  # what the server checks under `flwr run`
        load_for_resume({**resolve(SETTINGS), "output-dir": str(folder)})


@pytest.mark.parametrize("text", ["", "{\"dataset\": \"digits\",", "[1, 2]", "\"fedavg\""])
def test_broken_config_json_is_named_before_start(tmp_path, capsys, no_ray, text):
    folder = tmp_path / "run"
    make_run_folder(folder)
    (folder / CONFIG_FILE).write_text(text)
    assert resume_cli(folder) == 2
    assert str(folder / CONFIG_FILE) in capsys.readouterr().err


def test_missing_config_json_is_named(tmp_path, capsys, no_ray):
    (tmp_path / "empty").mkdir()
    assert resume_cli(tmp_path / "empty") == 2
    assert CONFIG_FILE in capsys.readouterr().err


def test_config_json_with_an_invalid_value_names_the_file_and_the_key(tmp_path, capsys, no_ray):
    folder = tmp_path / "run"
    make_run_folder(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({**SETTINGS, "sparsity": 3.0}))
    assert resume_cli(folder) == 2
    err = capsys.readouterr().err
    assert "'sparse.sparsity'" in err and CONFIG_FILE in err


@pytest.mark.parametrize("setting,key", [("sparsity=0.5", "sparsity"), ("seed=7", "seed"), ("lr=0.5", "lr"),
                                         ("dataset=usps", "dataset"), ("output-dir=/tmp/elsewhere", "output-dir")])
def test_resume_refuses_changing_what_decides_the_model(tmp_path, capsys, no_ray, setting, key):
    folder = tmp_path / "run"
    make_run_folder(folder)
    assert resume_cli(folder, setting) == 2
    err = capsys.readouterr().err
    assert key in err and "cannot change on resume" in err


def test_resume_refuses_a_preset_or_another_out(tmp_path, capsys, no_ray):
    folder = tmp_path / "run"
    make_run_folder(folder)
    assert cli_main(["run", "--resume", str(folder), "--preset", "main"]) == 2
    assert cli_main(["run", "--resume", str(folder), "--out", str(tmp_path / "other")]) == 2
    assert capsys.readouterr().err.count("--resume") == 2


def test_resume_allows_more_rounds_timeouts_device_resources_and_unchanged_values(tmp_path):
    folder = tmp_path / "run"
    make_run_folder(folder)
    cfg = build_config(None, ["num-rounds=5", "round-timeout=60", "device=cpu", "client-num-cpus=1",
                              "sparsity=0.8", "dataset=digits"], str(folder), str(folder))
    assert (cfg["num-rounds"], cfg["round-timeout"], cfg["device"], cfg["resume"]) == (5, 60.0, "cpu", True)
    preflight(cfg)  # the checkpoint (2 rounds of 2) accepts the change


def test_resume_refuses_fewer_rounds_than_done(tmp_path, capsys, no_ray):
    folder = tmp_path / "run"
    make_run_folder(folder, rounds_done=2)
    assert resume_cli(folder, "num-rounds=1") == 2
    assert "'num-rounds'" in capsys.readouterr().err


def test_checkpoint_made_with_other_settings_is_refused_naming_them(tmp_path, capsys, no_ray):
    folder = tmp_path / "run"
    make_run_folder(folder, seed=3, **{"sparse.sparsity": 0.5})  # config.json edited after the checkpoint was made
    assert resume_cli(folder) == 2
    err = capsys.readouterr().err
    assert "sparse.sparsity 0.5 -> 0.8" in err and "seed 3 -> 42" in err and str(folder / CHECKPOINT_FILE) in err


def test_a_copied_run_folder_resumes_and_retired_keys_are_ignored(tmp_path):
    original = tmp_path / "original"
    make_run_folder(original)
    saved = json.loads((original / CONFIG_FILE).read_text())
    (original / CONFIG_FILE).write_text(json.dumps({**saved, "retired-key": 1}))  # a key this version dropped
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    cfg = build_config(None, ["num-rounds=3"], None, str(copy))
    assert cfg["output-dir"] == str(copy.resolve())
    preflight(cfg)
    checkpoint = load_for_resume(cfg)
    assert checkpoint is not None and checkpoint.rounds_done == 2


def test_resume_without_a_checkpoint_starts_over(tmp_path):
    folder = tmp_path / "run"
    make_run_folder(folder)
    (folder / CHECKPOINT_FILE).unlink()
    cfg = build_config(None, [], None, str(folder))
    preflight(cfg)
    assert load_for_resume(cfg) is None


def test_config_error_type_is_kept():
    assert issubclass(ResumeError, ConfigError)  # `fedsparse run` reports both as exit code 2


def rounds(folder: Path) -> list[dict]:
    with open(folder / "rounds.csv") as f:
        return list(csv.DictReader(f))


def test_a_copied_run_resumes_with_more_rounds(tmp_path):
    """Real runs on Ray, as short as they go: 1 round, the folder copied, the copy resumed with num-rounds=2.
    (That a resumed run ends with the very model of an uninterrupted one is test_simulation's kill-and-resume.)"""
    first = tmp_path / "first"
    fedsparse_run(first, "dataset=digits", "num-clients=3", "num-rounds=1", "partitioner=iid", "strategy=fedavg")
    assert len(rounds(first)) == 1
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    proc = fedsparse_run(copy, "num-rounds=2", extra=("--resume", str(copy)))
    assert "round 2/2" in proc.stderr and "round 1/" not in proc.stderr  # round 1 came from the checkpoint
    assert [r["test_accuracy"] for r in rounds(copy)][:1] == [r["test_accuracy"] for r in rounds(first)]
    assert len(rounds(copy)) == 2
    saved = json.loads((copy / CONFIG_FILE).read_text())
    assert saved["num-rounds"] == 2 and saved["output-dir"] == str(copy.resolve())
    assert json.loads((copy / "summary.json").read_text())["rounds"] == 2
