"""How closely a rule follows backprop: gradient angles and feedback-weight alignment."""

from typing import Any, Callable, Mapping, Optional, Union

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax import traverse_util

from bioflax import converter, layers
from bioflax.trainer.nnx_adapter import NnxAdapter


def _leaves(tree) -> list[jax.Array]:
    return [jnp.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def _dot(a, b) -> jax.Array:
    """``⟨a, b⟩`` of two pytrees of the same structure, as one flattened vector each."""
    return sum(jnp.vdot(x, y) for x, y in zip(_leaves(a), _leaves(b)))


def _norm(a) -> jax.Array:
    return jnp.sqrt(_dot(a, a))


def cosine(a, b) -> jax.Array:
    """``⟨a, b⟩ / (‖a‖ ‖b‖)``, ``a`` and ``b`` arrays or pytrees of arrays taken as one
    flattened vector each (0 if either is zero).

    Reduced leaf by leaf: never concatenated, which costs XLA on CPUs more than the sums.
    """
    norms = _norm(a) * _norm(b)
    return jnp.where(norms > 0, _dot(a, b) / jnp.where(norms > 0, norms, 1.0), 0.0)


def angle_degrees(a, b) -> jax.Array:
    """The angle between ``a`` and ``b`` (as in :func:`cosine`) in degrees,
    ``2·atan2(‖â − b̂‖, ‖â + b̂‖)``.

    Exact to rounding for nearly parallel vectors, where ``arccos`` of the cosine is not.
    """
    a, b = _leaves(a), _leaves(b)
    tiny = jnp.finfo(jnp.result_type(*a, *b, jnp.float32)).tiny
    norm_a, norm_b = jnp.maximum(_norm(a), tiny), jnp.maximum(_norm(b), tiny)
    a_hat, b_hat = [x / norm_a for x in a], [y / norm_b for y in b]
    difference = _norm([x - y for x, y in zip(a_hat, b_hat)])
    total = _norm([x + y for x, y in zip(a_hat, b_hat)])
    return jnp.degrees(2 * jnp.arctan2(difference, total))


def kernel_layers(tree: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
    """The sub-dicts of a variable tree that hold a ``kernel``, keyed by their path."""
    flat = traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
    found: dict[str, dict[str, jax.Array]] = {}
    for path, value in flat.items():
        layer, _, leaf = path.rpartition("/")
        found.setdefault(layer or "layer", {})[leaf] = value
    return {name: leaves for name, leaves in found.items() if "kernel" in leaves}


def layers_in_call_order(module: Union[nn.Module, nnx.Module], *args, **kwargs) -> list[str]:
    """The paths (as :func:`kernel_layers` keys them) of ``module``'s layers that own a
    ``kernel``, in the order the forward pass first calls them: for a Linen module the
    paths of :func:`bioflax.converter.layer_records` (which traces ``init`` on ``args``),
    for an NNX model those of an abstract call on ``args`` (no computation either; the
    keys of :class:`bioflax.trainer.nnx_adapter.NnxAdapter`). The last is the model's
    output layer in a feed-forward net."""
    if isinstance(module, nnx.Module):
        return _nnx_layers_in_call_order(module, *args, **kwargs)
    records = converter.layer_records(module, *args, **kwargs)
    kernels = kernel_layers(jax.eval_shape(
        lambda: module.init(jax.random.key(0), *args, **kwargs)).get("params", {}))
    return list(dict.fromkeys(r.path for r in records if r.path in kernels))


def _nnx_layers_in_call_order(model: nnx.Module, *args, **kwargs) -> list[str]:
    """:func:`layers_in_call_order` of an NNX model: a copy whose layers with a kernel
    record their calls, called abstractly in evaluation mode."""
    adapter, model = NnxAdapter(model), nnx.clone(model)
    kernels = kernel_layers(adapter.variables().get("params", {}))
    called: list[str] = []
    for path, layer in nnx.iter_graph(model):
        if isinstance(layer, nnx.Module) and adapter.key(path) in kernels:
            object.__setattr__(layer, "__class__", _recording(type(layer), adapter.key(path),
                                                              called))
    model.eval()
    nnx.eval_shape(lambda model, *args: model(*args, **kwargs), model, *args)
    return list(dict.fromkeys(called))


def _recording(cls: type, key: str, called: list[str]) -> type:
    """A subclass of ``cls`` whose call appends ``key`` to ``called``."""
    def __call__(self, *args, **kwargs):
        called.append(key)
        return cls.__call__(self, *args, **kwargs)
    return type(cls.__name__, (cls,), {"__call__": __call__})


def _with_feedback(params, model_state):
    """``params`` with the fixed feedback matrices of ``model_state`` merged in per layer."""
    fixed = model_state.get(layers.FEEDBACK_COLLECTION, {})
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(flax.core.unfreeze(params)),
                                         **traverse_util.flatten_dict(flax.core.unfreeze(fixed))})


def _layer_vector(leaves) -> list[jax.Array]:
    """A layer's ``(W, b)`` as the pieces of one vector (see :func:`cosine`)."""
    return [leaves["kernel"]] + ([leaves["bias"]] if "bias" in leaves else [])


def _norm_ratio(a, b) -> jax.Array:
    """``‖a‖ / ‖b‖``; ``inf`` when only ``b`` is zero, 1 when both are (they agree)."""
    norm_a, norm_b = _norm(a), _norm(b)
    return jnp.where(norm_b > 0, norm_a / jnp.where(norm_b > 0, norm_b, 1.0),
                     jnp.where(norm_a > 0, jnp.inf, 1.0))


class Alignment:
    """How closely a rule's gradients follow backprop's, on the same parameters and batch.

    The trainer calls it inside the compiled step, on the steps whose index within the
    epoch is a multiple of ``every``, with the loss as a function of the parameters and
    the rule's gradients; it computes backprop's gradients under
    :func:`bioflax.layers.exact_backprop` and returns, per layer ``l`` with a kernel, Dense
    or Conv (its path in the parameter tree) and over all layers:

    - ``alignment/grad_cosine/l`` and ``alignment/grad_angle/l``: cosine and angle (°)
      between the rule's ``(dW_l, db_l)`` and backprop's;
    - ``alignment/relative_grad_norm``: ``‖g_BP‖ / ‖g_rule‖`` over all layers (1 when both
      are zero, inf when only the rule's is);
    - ``alignment/hidden_grad_angle``: the mean of the angles of the layers but the output
      layer (its own gradient is exact under every rule), ``output_layer``, which the
      trainer finds when it is not given (:meth:`bind`);
    - for layers with a feedback matrix shaped like ``W`` (FA, KP, interpolation):
      ``alignment/weight_cosine/l`` between ``W_l`` and ``B_l`` and
      ``alignment/weight_difference_norm/l`` ``= ‖W_l − B_l‖``.
    """

    def __init__(self, every: int, output_layer: Optional[str] = None):
        if every <= 0:
            raise ValueError(f"alignment every must be a positive number of steps, got {every}.")
        self.every = every
        self.output_layer = output_layer

    def bind(self, module, *args, **kwargs) -> "Alignment":
        """This metric for ``module`` called on ``args``: ``output_layer``, when not given,
        is the last layer with a kernel that the call reaches (:func:`layers_in_call_order`;
        none for a model that is one layer)."""
        called = [] if self.output_layer is not None else layers_in_call_order(
            module, *args, **kwargs)
        return Alignment(self.every, called[-1]) if called else self

    def __call__(self, loss_of_params: Callable[[Any], jax.Array], params,
                 model_state, grads) -> dict[str, jax.Array]:
        with layers.exact_backprop():
            backprop_grads = jax.grad(loss_of_params)(params)
        rule = kernel_layers(grads)
        reference = kernel_layers(backprop_grads)
        values = {}
        for name in rule:
            a, b = _layer_vector(rule[name]), _layer_vector(reference[name])
            values[f"alignment/grad_cosine/{name}"] = cosine(a, b)
            values[f"alignment/grad_angle/{name}"] = angle_degrees(a, b)
        all_rule = [_layer_vector(rule[n]) for n in rule]
        all_reference = [_layer_vector(reference[n]) for n in rule]
        values["alignment/grad_cosine/all"] = cosine(all_rule, all_reference)
        values["alignment/grad_angle/all"] = angle_degrees(all_rule, all_reference)
        values["alignment/relative_grad_norm"] = _norm_ratio(all_reference, all_rule)
        hidden = [values[f"alignment/grad_angle/{name}"] for name in rule
                  if self.output_layer is not None and name != self.output_layer]
        if hidden:
            values["alignment/hidden_grad_angle"] = jnp.mean(jnp.stack(hidden))
        for name, leaves in kernel_layers(_with_feedback(params, model_state)).items():
            feedback = leaves.get(layers.FEEDBACK_KERNEL)
            if feedback is not None and feedback.shape == leaves["kernel"].shape:
                values[f"alignment/weight_cosine/{name}"] = cosine(leaves["kernel"], feedback)
                values[f"alignment/weight_difference_norm/{name}"] = _norm(
                    leaves["kernel"] - feedback)
        return values

