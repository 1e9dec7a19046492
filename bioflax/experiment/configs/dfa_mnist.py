"""Direct Feedback Alignment MLP on MNIST: 784-500-500-10 tanh (see mnist_mlp.py).

Nøkland (2016) used tanh; with ReLU at this learning rate the DFA logits grow without
bound (test loss in the thousands after 400 steps).
"""

from bioflax.experiment.configs import mnist_mlp


def get_config():
    return mnist_mlp.get_config("dfa", "tanh")
