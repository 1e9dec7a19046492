"""Optimizers and learning-rate schedules, chosen by name from :data:`OPTIMIZERS` and
:data:`SCHEDULES`; :func:`build` makes the optimizer a ``config.optimizer`` describes."""

import fnmatch
import functools
from typing import Callable

import flax
import jax
import ml_collections
import optax


def _l2(config: ml_collections.ConfigDict,
        update: optax.GradientTransformation) -> optax.GradientTransformation:
    """``update`` of the gradient plus ``weight_decay · w`` (L2 decay, PyTorch's form)."""
    if not config.weight_decay:
        return update
    return optax.chain(optax.add_decayed_weights(config.weight_decay), update)


# name → (config.optimizer, learning rate or schedule) → the update rule, weight decay
# included.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": lambda config, learning_rate: _l2(
        config, optax.sgd(learning_rate, momentum=config.momentum or None,
                          nesterov=config.nesterov)),
    # PyTorch's and Torch7's form: g / (√ν + ε).
    "rmsprop": lambda config, learning_rate: _l2(config, optax.rmsprop(
        learning_rate, decay=config.rmsprop_decay, eps=1e-8, eps_in_sqrt=False)),
    "adam": lambda config, learning_rate: _l2(config, optax.adam(learning_rate)),
    # Decoupled decay: w ← w − lr·(adam(g) + wd·w), so equal gradients keep KP's W − B
    # shrinking by (1 − lr·wd) per step.
    "adamw": lambda config, learning_rate: optax.adamw(
        learning_rate, weight_decay=config.weight_decay),
}

def _multistep(config: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
    """The learning rate times ``decay_factor`` at each fraction ``decay_at`` of the run
    (PyTorch's MultiStepLR with milestones in epochs: 100 of 250 epochs is 0.4)."""
    return optax.piecewise_constant_schedule(
        config.learning_rate,
        {int(round(fraction * steps)): config.decay_factor for fraction in config.decay_at})


# name → (config.optimizer, steps after the warm-up) → schedule.
SCHEDULES: dict[str, Callable[[ml_collections.ConfigDict, int], optax.Schedule]] = {
    "constant": lambda config, steps: optax.constant_schedule(config.learning_rate),
    "cosine": lambda config, steps: optax.cosine_decay_schedule(config.learning_rate,
                                                                max(steps, 1)),
    "multistep": _multistep,
    # Constant, then from the fraction decay_at[0] of the run down linearly to 0 (the
    # cool-down of loeweX/Forward-Forward, which steps once per epoch).
    "linear_cooldown": lambda config, steps: optax.join_schedules(
        [optax.constant_schedule(config.learning_rate),
         optax.linear_schedule(config.learning_rate, 0.0,
                               max(steps - int(config.decay_at[0] * steps), 1))],
        [int(config.decay_at[0] * steps)]),
}


def _choose(registry: dict, name: str, field: str):
    if name not in registry:
        raise ValueError(f"Unknown {field} {name!r}; choose one of {list(registry)}.")
    return registry[name]


def build(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """The optimizer ``config`` (a ``config.optimizer``) names, its learning rate injected
    (so it can be logged); ValueError for an unknown optimizer or schedule name.

    Weight decay comes first in the chain but for ``adamw``, ``w ← w − lr·(u + wd·w)``,
    which makes Kolen-Pollack's ``W − B`` shrink by ``(1 − lr·wd)`` per plain SGD step.
    Each of ``groups`` (``(pattern, learning_rate, weight_decay)``) trains the parameters
    whose path matches its glob (the first that does) at its own rate and decay; with
    ``trainable`` patterns, parameters whose path matches none get no update.
    """
    optimizer = _single(config, total_steps)
    if config.groups:
        by_group = {pattern: _single(ml_collections.ConfigDict(
            {**config.to_dict(), "learning_rate": rate, "weight_decay": decay}), total_steps)
            for pattern, rate, decay in config.groups}
        optimizer = optax.multi_transform(
            {"": optimizer, **by_group},
            functools.partial(_group_labels, tuple(by_group)))
    if not config.trainable:
        return optimizer
    return optax.multi_transform({True: optimizer, False: optax.set_to_zero()},
                                 functools.partial(trainable, tuple(config.trainable)))


def _single(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """The update rule and schedule of ``config`` for every parameter."""
    update_rule = _choose(OPTIMIZERS, config.name, "optimizer.name")
    schedule = _choose(SCHEDULES, config.schedule, "optimizer.schedule")(
        config, total_steps - config.warmup_steps)
    if config.warmup_steps:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps), schedule],
            [config.warmup_steps])
    return optax.inject_hyperparams(
        lambda learning_rate: update_rule(config, learning_rate))(learning_rate=schedule)


def _group_labels(patterns: tuple[str, ...], params):
    """Each parameter's group: the first of ``patterns`` its path matches, else ``''``;
    ValueError for a pattern that matches no parameter."""
    return jax.tree.map(lambda match: match or "", _first_match("groups", patterns, params),
                        is_leaf=lambda x: x is None)


def trainable(patterns: tuple[str, ...], params):
    """``params``' tree of booleans: whether each path (``'head/kernel'``) matches a glob of
    ``patterns``; ValueError for a pattern that matches no parameter."""
    return jax.tree.map(lambda match: match is not None,
                        _first_match("trainable", patterns, params),
                        is_leaf=lambda x: x is None)


def _first_match(field: str, patterns: tuple[str, ...], params):
    """``params``' tree of the first glob of ``patterns`` each path matches (None: none);
    ValueError naming ``optimizer.<field>`` for a pattern that matches no parameter."""
    paths = ["/".join(path) for path in flax.traverse_util.flatten_dict(params)]
    for pattern in patterns:
        if not fnmatch.filter(paths, pattern):
            raise ValueError(f"optimizer.{field} pattern {pattern!r} matches no parameter; "
                             f"the parameters are {paths}.")
    return flax.traverse_util.path_aware_map(
        lambda path, _: next((p for p in patterns if fnmatch.fnmatchcase("/".join(path), p)),
                             None), params)
