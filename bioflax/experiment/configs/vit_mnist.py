"""The zoo's small Vision Transformer (``vit_mnist``, bioflax/zoo.py: patch 7, depth 3,
width 64, 4 heads, MLP ratio 2, 105,546 parameters) on MNIST, trained by a rule through
``bioflax.convert``: ``--config=configs/vit_mnist.py:fa`` (default ``bp``; any rule of
bioflax/rules.py). Adam at 1e-3 with 200 warm-up steps and cosine decay over 10 epochs,
batch 128, dropout 0.1: a common recipe for small ViTs, not tuned on a validation
split."""

from bioflax.experiment.configs import default


def get_config(rule: str = "bp"):
    config = default.get_config()
    config.data.flatten = False  # images (N, 28, 28, 1)
    config.model.name = "vit_mnist"
    config.model.rule = rule
    config.model.kernel_init = "xavier_uniform"
    config.model.feedback_init = "xavier_uniform"
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 200
    config.training.epochs = 10
    return config
