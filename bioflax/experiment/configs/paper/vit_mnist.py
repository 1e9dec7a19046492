"""The zoo's ViT (``vit_mnist``: patch 7, depth 3, width 64, 4 heads, MLP ratio 2, class
token, 105,546 parameters) on MNIST for every rule: ``--config=configs/paper/vit_mnist.py:SETTING``
with SETTING one of :data:`SETTINGS` (docs/results.md).

The protocol: 10 % of the training set held out for validation; Adam, batch 128, 200
warm-up steps then cosine decay over 10 epochs, dropout 0.1, Xavier-uniform W and B; each
setting's learning rate chosen on the validation split (``make vit-mnist-lr``: 3-epoch runs
of the same schedule, seed 0, from 3e-4 to 3e-2, the highest final validation accuracy;
docs/results.md lists them). KP takes AdamW, whose decoupled decay shrinks
``W − B`` by ``1 − lr·wd`` per step; its decay (0.1 or 1) was chosen with its rate. ``dfa`` is per-layer DFA
(token-wise at every projection), ``dfa_block`` Launay et al.'s per-block DFA (each
encoder block's output receives the projected error, backprop inside), ``head_only`` the
control that trains the head alone from the same initialisation. ``dfa_mean`` is per-layer
DFA on the ViT whose head reads the tokens' mean (no class token), with one ``B_l`` of the
features shared by every token (``model.dfa_position_feedback='shared'``), and ``bp_mean``
backprop on that ViT; ``dfa_block_mean`` per-block DFA on that ViT with the
blocks' ``B_b`` shared by the tokens likewise. Their rates were chosen as the others' were.
"""

from bioflax.experiment.configs import vit_mnist

# setting → learning rate, chosen on the validation split (module docstring).
LEARNING_RATES = {"bp": 1e-2, "fa": 1e-2, "kp": 1e-2, "dfa": 3e-3, "dfa_block": 3e-4,
                  "usf": 1e-2, "brsf": 1e-2, "frsf": 1e-2, "head_only": 3e-2,
                  "dfa_mean": 3e-3, "bp_mean": 1e-2, "dfa_block_mean": 3e-3}
KP_WEIGHT_DECAY = 0.1
# settings that are not a rule's name → their rule
RULES = {"dfa_block": "dfa", "head_only": "bp", "dfa_mean": "dfa", "bp_mean": "bp",
         "dfa_block_mean": "dfa"}
MEAN_POOLING = {"model.pooling": "mean"}
SHARED_FEEDBACK = {**MEAN_POOLING, "model.dfa_position_feedback": "shared"}
# setting → the fields it sets beyond vit_mnist.py's.
FIELDS = {
    "kp": {"optimizer.name": "adamw", "optimizer.weight_decay": KP_WEIGHT_DECAY},
    "dfa_block": {"model.feedback_points": ("block*",)},
    "head_only": {"optimizer.trainable": ("head/*",)},
    "dfa_mean": SHARED_FEEDBACK,
    "bp_mean": MEAN_POOLING,
    "dfa_block_mean": {**SHARED_FEEDBACK, "model.feedback_points": ("block*",)},
}
SETTINGS = tuple(LEARNING_RATES)


def get_config(setting: str = "bp"):
    if setting not in LEARNING_RATES:
        raise ValueError(f"Unknown setting {setting!r}; choose one of {list(SETTINGS)}.")
    config = vit_mnist.get_config(RULES.get(setting, setting))
    config.optimizer.learning_rate = LEARNING_RATES[setting]
    config.update_from_flattened_dict(FIELDS.get(setting, {}))
    config.training.log_every_epochs = 1.0
    config.alignment.every_epochs = 1.0
    config.plots = False
    return config
