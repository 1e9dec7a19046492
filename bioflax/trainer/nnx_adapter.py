"""A Flax NNX model behind the ``init`` / ``apply`` of a Linen module, so that a
:class:`bioflax.trainer.Task` trains it as it trains a Linen one: :class:`NnxAdapter`.

``flax.nnx.bridge.ToLinen`` builds its NNX module from a class at every call; a
converted model is an instance (its feedback weights drawn by ``bioflax.convert``), so the
adapter splits that instance once and merges it in every call.
"""

from typing import Any, Literal, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax import traverse_util
from flax.nnx import variablelib

Path = tuple[Any, ...]


def _scope(model: nnx.Module, paths: Sequence[Path]) -> Path:
    """The path prefix that keys leave out: ``('module',)`` for a wrapper whose every
    variable lives in its field ``module`` (``bioflax.convert``'s), so that it has the
    tree of the model it wraps, as a Linen wrapper sharing its module's scope does."""
    inner = vars(model).get("module")
    if isinstance(inner, nnx.Module) and paths and all(p[:1] == ("module",) for p in paths):
        return ("module",)
    return ()


def collection(variable_type: type) -> str:
    """The Linen collection of an NNX Variable type: the name ``flax.nnx`` registers for it
    (``'params'``, ``'batch_stats'``, ...), else its class name."""
    return variablelib.variable_name_from_type(variable_type, allow_register=True)


class NnxAdapter:
    """``model``, an ``nnx.Module``, called as a Linen module is:
    ``init(rngs, *args, **kwargs) -> variables`` and
    ``apply(variables, *args, rngs=, mutable=, train=, **kwargs)``.

    ``variables`` hold every Variable of the model as it is when the adapter is made, but
    its RNG state: one collection per Variable type (:func:`collection`: ``nnx.Param`` in
    ``'params'``, ``nnx.BatchStat`` in ``'batch_stats'``), keyed by the Variable's path
    with every part a string (``'layers/0/kernel'``); a wrapper whose variables all lie
    in its field ``module`` is keyed as that module. ``init`` returns copies of them (the
    model is built initialised, so its ``rngs`` only name the streams the trainer feeds).

    ``apply`` merges ``variables`` into a copy of the model, sets it to training mode
    (``model.train()``: Dropout on, BatchNorm updating its statistics) or, by default,
    evaluation mode (``model.eval()``), reseeds each RNG stream of the model from the key
    of its name in ``rngs`` (``nnx.reseed``), and calls it; it returns the outputs, and
    with ``mutable`` (collection names) also those collections' new values.
    """

    def __init__(self, model: nnx.Module):
        if not isinstance(model, nnx.Module):
            raise _not_a_module("NnxAdapter", "a flax.nnx.Module (a Linen module goes to "
                                "Task(module=...) as it is)", model)
        self.graphdef, rng_state, state = nnx.split(model, nnx.RngState, ...)
        self._rng_state = list(nnx.to_flat_state(rng_state))
        self.streams = sorted({variable.tag for _, variable in self._rng_state})
        flat = list(nnx.to_flat_state(state))
        self._scope = _scope(model, [path for path, _ in flat])
        # (collection, key path) -> (the Variable's path in the model, the Variable)
        self._variables = {
            (collection(type(variable)), tuple(map(str, path[len(self._scope):]))):
                (path, variable)
            for path, variable in flat}

    def key(self, path: Path) -> str:
        """The key of the model's module or Variable at ``path``, parts joined by ``/``."""
        return "/".join(map(str, path[len(self._scope):]))

    def variables(self) -> dict:
        """A copy of the model's variables (the trainer donates its state's buffers)."""
        return self._variable_tree({key: jnp.array(variable[...], copy=True)
                                    for key, (_, variable) in self._variables.items()})

    def init(self, rngs: Union[jax.Array, dict[str, jax.Array]], *args, **kwargs) -> dict:
        """:meth:`variables`; raises if ``rngs`` misses a stream the model draws."""
        del args, kwargs
        self._check_streams(rngs if isinstance(rngs, dict) else {})
        return self.variables()

    def apply(self, variables: dict, *args, rngs: Optional[dict[str, jax.Array]] = None,
              mutable: Union[Literal[False], Sequence[str]] = False, train: bool = False,
              **kwargs):
        """The outputs of the model holding ``variables`` (see the class docstring)."""
        model = self.merge(variables)
        if train:
            model.train()
        else:
            model.eval()
        rngs = rngs or {}
        self._check_streams(rngs)
        if self.streams:
            nnx.reseed(model, **{name: rngs[name] for name in self.streams})
        outputs = model(*args, **kwargs)
        if mutable is False:
            return outputs
        by_path = dict(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState))))
        updated = {key: by_path[path][...] for key, (path, _) in self._variables.items()
                   if key[0] in mutable}
        return outputs, self._variable_tree(updated)

    def merge(self, variables: dict) -> nnx.Module:
        """A copy of the model holding ``variables`` (its RNG state as it was made)."""
        flat = {(name, *path): value for name, tree in variables.items()
                for path, value in traverse_util.flatten_dict(dict(tree)).items()}
        state = nnx.from_flat_state(
            [(path, variable.replace(flat[(key[0], *key[1])]))
             for key, (path, variable) in self._variables.items()]
            + [(path, variable.replace(variable[...])) for path, variable in self._rng_state])
        return nnx.merge(self.graphdef, state)

    def _variable_tree(self, values: dict) -> dict:
        tree: dict = {}
        for (name, path), value in values.items():
            tree.setdefault(name, {})[path] = value
        return {name: traverse_util.unflatten_dict(flat) for name, flat in tree.items()}

    def _check_streams(self, rngs: dict) -> None:
        missing = [name for name in self.streams if name not in rngs]
        if missing:
            raise ValueError(
                f"The NNX model draws random numbers from the RNG streams {missing}, which "
                f"rngs does not key (it keys {sorted(rngs)}): pass a key for each of them "
                "(a Task feeds every stream its model draws).")


def _not_a_module(where: str, accepts: str, module: Any) -> TypeError:
    if isinstance(module, type) and issubclass(module, (nn.Module, nnx.Module)):
        return TypeError(f"{where} takes a module instance, not the class {module.__name__}: "
                         f"pass {module.__name__}(...).")
    return TypeError(f"{where} takes {accepts}, not {type(module).__name__}.")


def as_linen(module: Any) -> Any:
    """``module`` as the trainer calls it: a Linen module or an adapter as it is, an NNX
    model in an :class:`NnxAdapter`; anything else raises a ``TypeError``."""
    if isinstance(module, (nn.Module, NnxAdapter)):
        return module
    if isinstance(module, nnx.Module):
        return NnxAdapter(module)
    raise _not_a_module("Task.module", "a flax.linen.Module or a flax.nnx.Module", module)
