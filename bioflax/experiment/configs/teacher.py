"""Teacher-student regression: a 30-20-10 student learns a fixed linear teacher (Lillicrap 2016)."""

from bioflax.experiment.configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "teacher"
    config.data.input_dim = 30
    config.data.output_dim = 10
    config.data.train_size = 10_000
    config.data.test_size = 2_000
    config.data.val_split = 0.0
    config.data.batch_size = 50
    config.data.teacher_activation = "identity"
    config.model.rule = "fa"
    config.model.hidden_layers = (20,)
    config.model.activations = ("identity",)
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.0
    config.training.epochs = 20
    config.alignment.every_steps = 20
    return config
