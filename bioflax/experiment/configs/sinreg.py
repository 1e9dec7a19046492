"""Sine regression: y = sin(x), x uniform in [-π, π], learned by a small FA network."""

from bioflax.experiment.configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "sinreg"
    config.data.input_dim = 1
    config.data.output_dim = 1
    config.data.train_size = 5_000
    config.data.test_size = 1_000
    config.data.val_split = 0.0
    config.data.batch_size = 50
    config.model.rule = "fa"
    config.model.hidden_layers = (64, 64)
    config.model.activations = ("tanh", "tanh")
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-3
    config.training.epochs = 20
    config.alignment.every_steps = 20
    return config
