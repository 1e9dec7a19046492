"""Direct Feedback Alignment MLP on MNIST: 784-500-500-10 tanh (ReLU makes DFA logits blow up at this learning rate), SGD with momentum."""

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
