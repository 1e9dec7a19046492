"""LeNet-5 (biotorch's MNIST LeNet, bioflax/zoo.py) on MNIST resized to 32×32, trained by a
rule through ``bioflax.convert``: ``--config=configs/lenet_mnist.py:kp`` (default ``kp``;
any rule of bioflax/rules.py). Xavier-uniform W and B and SGD with momentum 0.9 as biotorch
trains it; learning rate 0.003 with cosine decay over 10 epochs (KP at 0.01 stayed near chance
for 2 epochs on the validation split, at 0.003 it reached 95.8% in 3), weight decay 1e-4
(which KP needs to align B with W), alignment of every conv and dense layer every 100 steps."""

from bioflax.conv import CPU_COMPILER_OPTIONS
from bioflax.experiment.configs import default


def get_config(rule: str = "kp"):
    config = default.get_config()
    config.data.flatten = False
    config.data.image_size = 32
    config.model.name = "lenet5"
    config.model.rule = rule
    config.model.kernel_init = "xavier_uniform"
    config.model.feedback_init = "xavier_uniform"
    config.optimizer.learning_rate = 0.003
    config.optimizer.schedule = "cosine"
    config.optimizer.weight_decay = 1e-4
    config.training.epochs = 10
    config.compiler_options = CPU_COMPILER_OPTIONS  # for the banded convolutions on a CPU
    return config
