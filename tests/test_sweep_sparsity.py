"""`simulations/sweep_sparsity.py`: cell parsing, the 95% t-interval against hand computation, and a tiny
in-process sweep on `digits` whose files (csv, table with intervals, per-layer mask densities, plot) are checked."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytest

from tests.conftest import load_script

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_torch_thread", "task_identity")


def sweep():
    return load_script("sweep_sparsity")


def test_cells_parse_and_refuse_by_name():
    cell = sweep().Cell
    assert cell.parse("fedavg") == cell("fedavg", 0.0, "float32")
    assert cell.parse("ssfl:0.9") == cell("ssfl", 0.9, "float32")
    assert cell.parse("ssfl:0.9:int8") == cell("ssfl", 0.9, "int8")
    assert cell.parse("ssfl:0.9:int8").label == "ssfl 0.9 int8" and cell.parse("ssfl:0.9").label == "ssfl 0.9"
    assert cell.parse("ssfl:0.9:int8").folder(3) == "ssfl-s0.9-int8-seed3"
    assert cell.parse("fedavg").assignments() == ["strategy=fedavg"]
    for bad, reason in [("fedavg:0.5", "fedavg is dense"), ("ssfl", "needs a sparsity"), ("ssfl:x", "not a number"),
                        ("ssfl:1.0", "needs a sparsity"), ("a:0.5:int8:x", "strategy"), ("", "strategy")]:
        with pytest.raises(ValueError, match=reason):
            cell.parse(bad)


def test_t_interval_matches_hand_computation():
    t_interval = sweep().t_interval
    # [1, 2, 3]: mean 2, sd 1, t(0.975, 2 df) = 4.302653 -> half-width 4.302653 / sqrt(3)
    got = t_interval([1.0, 2.0, 3.0])
    assert got.mean == 2.0 and got.n == 3 and math.isclose(got.half_width, 4.302653 / math.sqrt(3), rel_tol=1e-6)
    # 5 values: t(0.975, 4 df) = 2.776445
    values = [70.0, 72.0, 74.0, 76.0, 78.0]
    assert math.isclose(t_interval(values).half_width, 2.776445 * math.sqrt(10.0) / math.sqrt(5), rel_tol=1e-6)
    assert t_interval([5.0]).half_width == 0.0
    with pytest.raises(ValueError, match="at least one value"):
        t_interval([])


def test_a_tiny_in_process_sweep_writes_intervals_densities_and_plot(tmp_path):
    preset = tmp_path / "tiny.toml"
    preset.write_text('dataset = "digits"\nmodel = "mlp"\nnum-clients = 3\npartitioner = "iid"\n'
                      'fraction-train = 0.67\nlr = 0.05\neval-every = 2\n')
    out = tmp_path / "sweep"
    level = logging.getLogger("fedsparse").level
    try:
        sweep().main(["--in-process", "--preset", str(preset), "--out", str(out), "--rounds", "3", "--seeds", "1",
                      "2", "--cells", "fedavg", "ssfl:0.5"])
    finally:
        logging.getLogger("fedsparse").setLevel(level)
    with (out / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["strategy"], r["seed"]) for r in rows] == [("fedavg", "1"), ("ssfl", "1"), ("fedavg", "2"),
                                                          ("ssfl", "2")]
    assert all(r["rounds"] == "3" for r in rows)
    ssfl = [float(r["final_accuracy"]) for r in rows if r["strategy"] == "ssfl"]
    expected = sweep().t_interval([100 * a for a in ssfl])
    md = (out / "sweep.md").read_text()
    assert f"| ssfl 0.5 | {expected.mean:.2f} ± {expected.half_width:.2f} |" in md
    assert "| 2 (1,2) |" in md
    # the mask keeps half of the mlp's weights in total: the per-layer fractions, weighted by size, give 0.5
    import torch

    folder = out / "ssfl-s0.5-seed1"
    densities = sweep().layer_densities(folder)
    sizes = {k: v.numel() for k, v in torch.load(folder / "final_model.pt").items() if k in densities}
    assert len(densities) == 3  # the mlp's three linear weights
    kept = sum(densities[k] * sizes[k] for k in densities)
    assert abs(kept - 0.5 * sum(sizes.values())) <= 1
    assert sweep().layer_densities(out / "fedavg-s0-seed1") == {}
    density_line = next(line for line in md.splitlines() if line.startswith("| ssfl 0.5 |") and "±" not in line)
    assert len(density_line.split("|")) - 2 == 4  # the cell and three layers
    assert (out / "sweep.png").stat().st_size > 0
    # a second call runs nothing: every run is finished
    sweep().main(["--report-only", "--out", str(out), "--rounds", "3", "--seeds", "1", "2", "--cells", "fedavg",
                  "ssfl:0.5"])
    assert (out / "sweep.md").read_text() == md


def test_paired_differences_use_the_seeds_both_cells_have():
    module = sweep()

    def result(strategy: str, sparsity: float, seed: int, accuracy: float, dtype: str = "float32"):
        return module.RunResult(strategy=strategy, sparsity=sparsity, value_dtype=dtype, seed=seed, rounds=50,
                                final_accuracy=accuracy, best_accuracy=accuracy, mb_per_round=1.0, total_mb=50.0,
                                bytes_ratio_vs_dense=1.0, seconds=1.0)

    results = [result("fedavg", 0.0, 1, 0.80), result("fedavg", 0.0, 2, 0.70), result("fedavg", 0.0, 3, 0.75),
               result("ssfl", 0.9, 1, 0.78), result("ssfl", 0.9, 2, 0.69), result("ssfl", 0.9, 3, 0.72),
               result("ssfl", 0.9, 1, 0.775, "int8"), result("ssfl", 0.9, 2, 0.695, "int8"),
               result("magnitude", 0.9, 2, 0.66), result("magnitude", 0.9, 3, 0.74)]
    lines = module.paired_table(results).splitlines()
    by_name = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert set(by_name) == {"ssfl 0.9 − fedavg", "magnitude 0.9 − fedavg", "ssfl 0.9 int8 − ssfl 0.9",
                            "ssfl 0.9 − magnitude 0.9"}
    # ssfl - fedavg per seed: -2, -1, -3 points: mean -2, sd 1, half-width t(0.975, 2) / sqrt(3) = 2.48
    assert by_name["ssfl 0.9 − fedavg"] == "| ssfl 0.9 − fedavg | -2.00 ± 2.48 | -2.00, -1.00, -3.00 | 3 (1,2,3) |"
    # int8 - float32 on seeds 1, 2 only: -0.5, +0.5
    assert "| +0.00 ± 6.35 | -0.50, +0.50 | 2 (1,2) |" in by_name["ssfl 0.9 int8 − ssfl 0.9"]
    # ssfl - magnitude on seeds 2, 3: +3, -2
    assert "| +0.50 ± " in by_name["ssfl 0.9 − magnitude 0.9"] and "2 (2,3)" in by_name["ssfl 0.9 − magnitude 0.9"]


def test_a_sweep_pairs_each_cell_with_the_same_cell_and_fedavg_of_a_baseline_sweep():
    module = sweep()

    def result(strategy: str, sparsity: float, seed: int, accuracy: float):
        return module.RunResult(strategy=strategy, sparsity=sparsity, value_dtype="float32", seed=seed, rounds=50,
                                final_accuracy=accuracy, best_accuracy=accuracy, mb_per_round=1.0, total_mb=50.0,
                                bytes_ratio_vs_dense=1.0, seconds=1.0)

    variant = [result("ssfl", 0.9, 1, 0.74), result("ssfl", 0.9, 2, 0.70), result("ssfl", 0.9, 4, 0.60)]
    baseline = [result("ssfl", 0.9, 1, 0.76), result("ssfl", 0.9, 2, 0.71), result("ssfl", 0.9, 3, 0.70),
                result("fedavg", 0.0, 1, 0.79), result("fedavg", 0.0, 2, 0.74), result("magnitude", 0.9, 1, 0.5)]
    lines = module.baseline_table(variant, baseline, "layerwise", "sweep_long").splitlines()
    by_name = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert set(by_name) == {"ssfl 0.9 [layerwise] − ssfl 0.9 [sweep_long]", "ssfl 0.9 [layerwise] − fedavg [sweep_long]"}
    # seeds 1 and 2 only (seed 4 has no baseline run): -2 and -1 points, mean -1.5, sd 0.707, t(0.975, 1) = 12.71
    assert by_name["ssfl 0.9 [layerwise] − ssfl 0.9 [sweep_long]"].endswith("| -1.50 ± 6.35 | -2.00, -1.00 | 2 (1,2) |")
    assert "| -4.50 ± 6.35 | -5.00, -4.00 | 2 (1,2) |" in by_name["ssfl 0.9 [layerwise] − fedavg [sweep_long]"]
    assert module.baseline_table(variant, [result("fedavg", 0.0, 9, 0.8)], "a", "b") == ""
    dense = module.baseline_table([result("fedavg", 0.0, 1, 0.81)], baseline, "lr-0.1", "sweep_long").splitlines()
    assert dense[2:] == ["| fedavg [lr-0.1] − fedavg [sweep_long] | +2.00 ± 0.00 | +2.00 | 1 (1) |"]
