"""The zoo's small causal Transformer language model (``transformer_lm``, bioflax/zoo.py:
depth 2, width 64, 4 heads, MLP ratio 4) on a local UTF-8 text file, bytes as tokens, 64
per window: ``--config=configs/text_lm.py:RULE --config.data.text_path=FILE`` (default rule
``bp``; any rule of bioflax/rules.py). The last 10 % of the file is the test split and the
last 10 % of the rest the validation split; Adam at 1e-3 with cosine decay, batch 32, 2
epochs: a CPU-sized default (a 1 MB file is about 14,000 windows, 440 steps an epoch).
``--config.model.tie_embeddings=True`` ties the output projection to the token embedding;
``--config.data.text_tokens=characters`` uses the file's characters as tokens."""

from bioflax.experiment.configs import default


def get_config(rule: str = "bp"):
    config = default.get_config()
    config.data.dataset = "text"
    config.data.context_length = 64
    config.data.batch_size = 32
    config.data.eval_batch_size = 256
    config.model.name = "transformer_lm"
    config.model.rule = rule
    config.model.kernel_init = "xavier_uniform"
    config.model.feedback_init = "xavier_uniform"
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 100
    config.training.epochs = 2
    config.training.log_every_steps = 50
    return config
