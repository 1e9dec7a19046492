"""The MNIST MLP that the per-rule configs share: 784-500-500-10, SGD with momentum 0.9,
learning rate 0.05 with cosine decay, 20 epochs, batch 128, 10% of train for validation."""

from bioflax.experiment.configs import default


def get_config(rule: str = "bp", activation: str = "relu"):
    config = default.get_config()
    config.model.rule = rule
    config.model.hidden_layers = (500, 500)
    config.model.activations = (activation, activation)
    config.optimizer.learning_rate = 0.05
    config.optimizer.schedule = "cosine"
    config.training.epochs = 20
    return config
