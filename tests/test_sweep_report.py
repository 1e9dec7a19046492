"""The grid runner (bioflax.experiment.sweep) and the comparison of finished runs
(bioflax.experiment.report)."""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from clu import metric_writers

from bioflax.experiment import report, sweep
from bioflax.experiment import validate as config_validation
from bioflax.experiment.tensorboard_reader import read_scalars
from e2e import REPO, environment

pytestmark = pytest.mark.e2e  # runs main.py or other processes: `pytest -m 'not e2e'` skips it


def _sweep(root, *args):
    return subprocess.run(
        [sys.executable, "-m", "bioflax.experiment.sweep", "configs/teacher.py", "configs/sinreg.py",
         "--seeds=0,1", f"--root={root}", "--override=training.epochs=1",
         "--override=plots=False", *args],
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)


def test_run_names_and_workdirs_follow_the_config_and_its_argument():
    assert sweep.run_name("configs/paper/akrout2019.py:fa") == "akrout2019_fa"
    assert sweep.run_name("configs/teacher.py") == "teacher"
    assert sweep.workdir("runs", "configs/teacher.py", 2) == os.path.join(
        "runs", "teacher", "seed_2")


def test_sweep_runs_every_config_and_seed_once_and_skips_finished_runs(tmp_path):
    first = _sweep(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    results = {}
    for name in ("teacher", "sinreg"):
        for seed in (0, 1):
            workdir = tmp_path / name / f"seed_{seed}"
            with open(workdir / "result.json", encoding="utf-8") as f:
                results[name, seed] = json.load(f)
            assert results[name, seed]["steps"] == read_scalars(workdir)["train/loss"][-1][0]
    # Different seeds are different runs: different data and initialisation.
    assert (results["teacher", 0]["test"]["test/loss"]
            != results["teacher", 1]["test"]["test/loss"])
    stamps = {path: os.stat(path).st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()}

    again = _sweep(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished, skipped") == 4
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps  # nothing was touched


def test_sweep_names_a_missing_config_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bioflax.experiment.sweep", "configs/nope.py",
                             f"--root={tmp_path}"], cwd=REPO, env=environment(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "config file configs/nope.py not found" in result.stderr
    assert not list(tmp_path.iterdir())


def _fake_run(workdir, accuracy: float, angles: tuple[float, float], wall_time: float,
              steps: int = 200):
    """A finished two-layer run: accuracy and angle curves over two logged steps."""
    writer = metric_writers.create_default_writer(str(workdir), just_logging=False)
    for step in (100, 200):
        writer.write_scalars(step, {
            "train/loss": 1.0 / step,
            "alignment/grad_angle/layer_0": angles[step // 100 - 1],
            "alignment/grad_angle/layer_1": 0.0,
            "alignment/weight_cosine/layer_0": 0.5,
            "alignment/weight_cosine/layer_1": 0.7,
        })
    writer.write_scalars(200, {"test/accuracy": accuracy, "test/loss": 0.1})
    writer.flush()
    with open(os.path.join(workdir, "result.json"), "w", encoding="utf-8") as f:
        json.dump({"test": {"test/accuracy": accuracy, "test/loss": 0.1}, "steps": steps,
                   "wall_time_s": wall_time, "device": "cpu"}, f)


def test_report_averages_seed_directories_into_one_row(tmp_path):
    for seed, (accuracy, final_angle, wall, steps) in enumerate([(0.97, 30.0, 10.0, 200),
                                                                 (0.98, 40.0, 20.0, 150)]):
        os.makedirs(tmp_path / "fa" / f"seed_{seed}")
        _fake_run(tmp_path / "fa" / f"seed_{seed}", accuracy, (80.0, final_angle), wall, steps)
    os.makedirs(tmp_path / "fa" / "seed_2")  # still running: no result.json, left out
    _fake_run(tmp_path / "fa" / "seed_2", 0.5, (90.0, 90.0), 1.0)
    os.remove(tmp_path / "fa" / "seed_2" / "result.json")
    os.makedirs(tmp_path / "single")
    _fake_run(tmp_path / "single", 0.9, (10.0, 5.0), 3.0)

    written = report.write_report([str(tmp_path / "fa"), str(tmp_path / "single")],
                                  str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in written) == [
        "alignment.png", "report.md", "report.png"]
    summary, _, each = open(written[0], encoding="utf-8").read().partition("Each run:")
    rows = summary.strip().splitlines()[2:]
    fa = [cell.strip() for cell in rows[0].split("|")[1:-1]]
    single = [cell.strip() for cell in rows[1].split("|")[1:-1]]
    # mean ± population std of (97, 98) %, of the final hidden angles (30, 40) and walls;
    # the range of the steps (the second seed stopped early).
    assert fa == ["fa", "2", "—", "97.50 ± 0.50", "0.1000 ± 0.0000", "150–200", "35.00 ± 5.00",
                  "0.6000 ± 0.0000", "15.00 ± 5.00", "cpu"]
    assert single[:4] == ["single", "1", "—", "90.00"]
    runs = [[cell.strip() for cell in row.split("|")[1:-1]]
            for row in each.strip().splitlines()[2:]]
    assert [row[:2] for row in runs] == [["fa/seed_0", "97.00"], ["fa/seed_1", "98.00"],
                                         ["single", "90.00"]]
    assert [row[4:6] for row in runs] == [["10", "cpu"], ["20", "cpu"], ["3", "cpu"]]


def test_report_of_named_layers_uses_the_logged_hidden_angle_and_lists_every_layer(tmp_path):
    """A zoo model's layers (conv1, conv2, fc1, fc2 in natural order, conv10 after conv2) and
    the trainer's mean over its hidden layers; the validation accuracy."""
    writer = metric_writers.create_default_writer(str(tmp_path / "kp"), just_logging=False)
    angles = {"conv1": 40.0, "conv2": 30.0, "conv10": 20.0, "fc2": 0.5}
    writer.write_scalars(100, {**{f"alignment/grad_angle/{k}": v for k, v in angles.items()},
                               "alignment/grad_angle/all": 25.0,
                               "alignment/hidden_grad_angle": 30.0, "val/accuracy": 0.875,
                               "test/accuracy": 0.75, "test/loss": 0.5})
    writer.flush()
    summary, _, rest = open(report.write_report([str(tmp_path / "kp")], str(tmp_path / "out"))[0],
                            encoding="utf-8").read().partition("per layer (°):")
    row = [cell.strip() for cell in summary.strip().splitlines()[2].split("|")[1:-1]]
    assert row[:3] == ["kp", "1", "87.50"] and row[6] == "30.00"
    header, _, values = rest.strip().splitlines()[:3]
    assert [c.strip() for c in header.split("|")[1:-1]] == ["run", "conv1", "conv2", "conv10",
                                                           "fc2"]
    assert [c.strip() for c in values.split("|")[1:-1]] == ["kp", "40.00", "30.00", "20.00",
                                                           "0.5000"]


def test_report_tells_apart_runs_of_one_config_under_two_roots(tmp_path):
    for root, accuracy in (("paper", 0.97), ("ablation", 0.95)):
        os.makedirs(tmp_path / root / "dfa")
        _fake_run(tmp_path / root / "dfa", accuracy, (80.0, 60.0), 1.0)
    paths = [str(tmp_path / "paper" / "dfa"), str(tmp_path / "ablation" / "dfa")]
    assert report.group_names(paths) == ["paper/dfa", "ablation/dfa"]
    assert report.group_names([str(tmp_path / "paper" / "dfa"), str(tmp_path / "x")]) == [
        "dfa", "x"]
    summary = open(report.write_report(paths, str(tmp_path / "out"))[0],
                   encoding="utf-8").read().partition("Each run:")[0]
    rows = [[c.strip() for c in row.split("|")[1:-1]]
            for row in summary.strip().split("\n\n")[0].splitlines()[2:]]
    assert [row[0] for row in rows] == ["paper/dfa", "ablation/dfa"]
    assert [row[3] for row in rows] == ["97.00", "95.00"]


def test_mean_curve_uses_the_steps_every_seed_logged():
    class FakeRun:  # pylint: disable=too-few-public-methods
        def __init__(self, points):
            self.scalars = {"x": points}

    steps, mean, std = report.mean_curve(
        [FakeRun([(1, 1.0), (2, 3.0), (3, 9.0)]), FakeRun([(1, 3.0), (2, 5.0)])], "x")
    np.testing.assert_array_equal(steps, [1, 2])
    np.testing.assert_allclose(mean, [2.0, 4.0])
    np.testing.assert_allclose(std, [1.0, 1.0])


def test_report_cli_names_a_directory_without_runs(tmp_path):
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2


PAPER_SETTINGS = ([("akrout2019", rule) for rule in ("bp", "fa", "kp")]
                  + [("nokland2016", f"{arch}_{rule}") for arch in ("7x240", "2x800", "1x800")
                     for rule in ("bp", "fa", "dfa")]
                  + [("lillicrap2016", rule) for rule in ("bp", "fa")])
# Settings that are not a rule's name: the rule and the procedure they train by.
PROCEDURE_SETTINGS = {
    ("akrout2019", "wm"): ("fa", "weight_mirror"),
    **{("frenkel2021", rule): (rule, "gradient") for rule in ("drtp", "dfa", "fa", "bp")},
    ("frenkel2021", "sdfa"): ("dfa", "gradient"),
    ("dellaferrera2022", "pepita"): ("bp", "pepita"),
    ("dellaferrera2022", "bp"): ("bp", "gradient"),
    ("hinton2022", "classifier"): ("bp", "forward_forward"),
    ("hinton2022", "goodness"): ("bp", "forward_forward"),
    **{("vit_mnist", setting): (rule, "gradient") for setting, rule in (
        ("bp", "bp"), ("fa", "fa"), ("kp", "kp"), ("dfa", "dfa"), ("dfa_block", "dfa"),
        ("usf", "usf"), ("brsf", "brsf"), ("frsf", "frsf"), ("head_only", "bp"))},
}


@pytest.mark.parametrize("module, setting", PAPER_SETTINGS)
def test_every_paper_config_is_valid(module, setting):
    config = importlib.import_module(f"configs.paper.{module}").get_config(setting)
    config_validation.validate(config)
    assert config.model.rule == setting.rsplit("_", 1)[-1]


@pytest.mark.parametrize("module, setting", sorted(PROCEDURE_SETTINGS))
def test_every_procedure_and_transformer_config_is_valid(module, setting):
    config = importlib.import_module(f"configs.paper.{module}").get_config(setting)
    config_validation.validate(config)
    assert (config.model.rule, config.procedure.name) == PROCEDURE_SETTINGS[module, setting]


def test_paper_configs_name_their_settings_when_given_an_unknown_one():
    from bioflax.experiment.configs.paper import (  # pylint: disable=import-outside-toplevel
        akrout2019, lillicrap2016, nokland2016)
    with pytest.raises(ValueError, match="choose one of"):
        akrout2019.get_config("dfa")
    with pytest.raises(ValueError, match="choose one of"):
        lillicrap2016.get_config("kp")
    with pytest.raises(ValueError, match="e.g. 7x240_dfa"):
        nokland2016.get_config("3x100_fa")
