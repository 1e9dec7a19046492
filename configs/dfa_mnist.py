"""Direct Feedback Alignment MLP on MNIST: 784-500-500-10 tanh, SGD with momentum.

Nøkland (2016) used tanh; with ReLU at this learning rate the DFA logits grow without
bound (test loss in the thousands after 400 steps).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.mode = "dfa"
    config.model.hidden_layers = (500, 500)
    config.model.activations = ("tanh", "tanh")
    config.optimizer.learning_rate = 0.05
    config.optimizer.schedule = "cosine"
    config.training.epochs = 20
    return config
