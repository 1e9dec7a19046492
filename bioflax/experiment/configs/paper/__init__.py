"""Configs of published MNIST settings (docs/results.md)."""

from bioflax.experiment.configs import default


def mnist_protocol(batch_size: int):
    """``default.get_config()`` set to what the papers share: all 60k training images (no
    validation split), pixels in [0, 1], a sigmoid per output class with binary
    cross-entropy, metrics and alignment logged once per epoch, no plots."""
    config = default.get_config()
    config.data.val_split = 0.0
    config.data.normalize_mean = 0.0
    config.data.normalize_std = 1.0
    config.data.batch_size = batch_size
    config.model.loss = "sigmoid_cross_entropy"
    config.training.log_every_epochs = 1.0
    config.alignment.every_epochs = 1.0
    config.plots = False
    return config
