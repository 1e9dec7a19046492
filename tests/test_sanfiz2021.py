"""The Sanfiz & Akrout 2021 configs: what they resolve to, and that every CIFAR-10 recipe
trains a few steps (fast_dev_run) on a mock CIFAR-10 (tfds.testing.mock_data: no files, no
network)."""

import os

import jax
import numpy as np
import pytest

from bioflax.experiment import datasets as data
from bioflax.experiment import optimizers
from bioflax.experiment import run as train
from bioflax.experiment import validate as config_validation
from bioflax.experiment.configs.paper import sanfiz2021


def test_every_setting_validates_and_names_its_model_and_rule():
    for (dataset, model) in sanfiz2021.SETTINGS:
        for rule in sanfiz2021.RULES:
            config = sanfiz2021.get_config(f"{dataset}_{model}_{rule}")
            config_validation.validate(config)
            assert (config.data.dataset, config.model.rule) == (dataset, rule)
    with pytest.raises(ValueError, match="mnist_lenet5"):
        sanfiz2021.get_config("mnist_resnet20_bp")


def test_mnist_learning_rates_are_the_ones_chosen_in_docs_results():
    """Each MNIST rule trains at the rate marked (bold) in docs/results.md's selection table."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "results.md")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| rule | 0.1 |"))
    rates = [float(cell) for cell in lines[header].strip("|").split("|")[1:]]
    chosen = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        rule, *cells = [cell.strip() for cell in line.strip("|").split("|")]
        bold = [rate for rate, cell in zip(rates, cells) if cell.startswith("**")]
        assert len(bold) == 1, line
        chosen[rule.lower()] = bold[0]
    assert set(chosen) == set(sanfiz2021.RULES)
    for rule, rate in chosen.items():
        assert sanfiz2021.get_config(f"mnist_lenet5_{rule}").optimizer.learning_rate == rate, rule


def test_multistep_schedule_drops_tenfold_at_biotorchs_epochs():
    """CIFAR-10: 250 epochs of 45,000 // 128 = 351 steps, ×0.1 at epochs 100, 150, 200."""
    config = sanfiz2021.get_config("cifar10_resnet20_bp")
    steps_per_epoch = 45_000 // 128
    schedule = optimizers.SCHEDULES["multistep"](config.optimizer, 250 * steps_per_epoch)
    expected = {0: 0.1, 99: 0.1, 100: 0.01, 149: 0.01, 150: 1e-3, 199: 1e-3, 200: 1e-4,
                249: 1e-4}
    for epoch, rate in expected.items():
        assert float(schedule(epoch * steps_per_epoch)) == pytest.approx(rate), epoch
    # the optimizer follows it: its injected rate is 0.1 at first, 0.01 after 100 epochs
    optimizer = optimizers.build(config.optimizer, 250 * steps_per_epoch)
    params = {"w": np.zeros(3, np.float32)}
    state = optimizer.init(params)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1)
    grads = {"w": np.ones(3, np.float32)}
    step = jax.jit(lambda state: optimizer.update(grads, state, params)[1])
    for _ in range(100 * steps_per_epoch):
        state = step(state)
    # inject_hyperparams reads the schedule at the count before the update
    assert float(step(state).hyperparams["learning_rate"]) == pytest.approx(0.01)


def mock_cifar10(monkeypatch, num_examples):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(data, "_can_reach", lambda *args: (True, None))
    return tfds.testing.mock_data(num_examples=num_examples,
                                  policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.mark.e2e  # a whole run.train_and_evaluate (over 10 s)
@pytest.mark.parametrize("setting", ["cifar10_resnet20_kp", "cifar10_lenet_dfa"])
def test_cifar10_recipe_runs_a_fast_dev_run_on_mock_data(setting, tmp_path, monkeypatch):
    config = sanfiz2021.get_config(setting)
    config.data.data_dir = str(tmp_path / "no_tfds_here")
    config.data.eval_batch_size = 64
    config.training.fast_dev_run = 2
    with mock_cifar10(monkeypatch, num_examples=512):
        result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(result["state"].step) == 2
    assert np.isfinite(result["test"]["test/loss"])
    # KP's B beside every kernel; DFA's fixed matrices at the inputs of the layers
    params = result["state"].params
    if setting.endswith("_kp"):
        assert "feedback_kernel" in params["conv1"] and "feedback_kernel" in params["fc"]
    else:
        assert "output_feedback" in result["state"].model_state["feedback"]["fc2"]
