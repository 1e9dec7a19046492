"""``convert(module, rule)``: any Flax model, its ``nn.Dense`` and ``nn.Conv`` layers trained
by a learning rule of :mod:`bioflax.rules`.

The converted model runs the user's module unchanged under ``nn.intercept_methods``: each
``nn.Dense`` / ``nn.Conv`` call is replaced by a clone of that layer, on the same scope,
whose ``dot_general`` / ``conv_general_dilated`` is the rule's operation. So the forward
pass is the original's exactly, the ``'params'`` tree is the original's leaf for leaf
(Kolen-Pollack adds ``feedback_kernel`` beside each ``kernel``), and fixed feedback
matrices go to the ``'feedback'`` collection at the layer's path.

On CPU the convolutions of converted ``nn.Conv`` layers run as banded matrix products
(:mod:`bioflax.conv`), equal to XLA's convolution up to float rounding and several times
faster to train inside a compiled loop there; a layer given its own
``conv_general_dilated`` keeps it.

Everything else — BatchNorm, LayerNorm, pooling, activations, residual additions,
embeddings, and layers of other classes (``DenseGeneral``, ``Einsum``, ``ConvTranspose``,
``ConvLocal``) — keeps exact backprop: it passes on whatever signal reaches it from above.

**DFA through any graph.** With ``rule='dfa'`` every converted layer except the first (in
call order) reads its input ``x_l`` through ``stop_gradient``, and the model's output ``y``
passes through an identity whose VJP sends ``e B_lᵀ`` (``e = ∂L/∂y``, reshaped to
``x_l``'s shape) to every such ``x_l``. ``B_l``, of shape ``(size of one example of x_l,
n_outputs)``, is fixed, drawn with ``feedback_init`` (LeCun normal: std ``1/√size``) and
stored as ``output_feedback`` in the ``'feedback'`` collection of the layer that reads
``x_l``. Autodiff carries ``e B_lᵀ`` through the activation, pooling or reshape below to
the layer that produced ``x_l``: its ``δ = φ'(a) ⊙ (e B_lᵀ)``, Nøkland's DFA. A tensor
read by several converted layers receives the sum of their projections, plus what reaches
it through paths without converted layers (an identity shortcut). DFA needs a model
output of shape ``(batch, n_outputs)``.

With ``conv_feedback='shared_kernel'`` the ``B_l`` at a Conv layer's input is instead a
kernel of shape ``(kh, kw, C, n_outputs)`` (as biotorch's DFA ``Conv2d``): the input
receives the transposed convolution, with the layer's strides, padding and dilation, of
``e`` repeated at every position of the layer's output map, i.e. the input-gradient of
``Σ_positions conv(x_l, B_l)``; the same random weights at every position, so the signal is
nearly uniform across space (it differs only near the borders).
"""

import contextlib
import contextvars
import dataclasses
import fnmatch
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from bioflax import conv as conv_lib
from bioflax import rules

DFA_FEEDBACK = "output_feedback"
KeepBackprop = Union[Sequence[str], Callable[[str, nn.Module], bool]]

def _default_conv(*args, **kwargs):
    """``nn.Conv``'s convolution: on XLA:CPU :func:`bioflax.conv.conv_general_dilated`
    (banded matmuls, whose gradients avoid XLA:CPU's slow backward convolutions inside
    ``lax.scan``, jax-ml/jax#12868), elsewhere ``lax.conv_general_dilated``."""
    if jax.default_backend() == "cpu":
        return conv_lib.conv_general_dilated(*args, **kwargs)
    return jax.lax.conv_general_dilated(*args, **kwargs)


# The primitive field of each convertible layer class, and the function it defaults to.
_PRIMITIVES = {
    nn.Dense: ("dot_general", jax.lax.dot_general),
    nn.Conv: ("conv_general_dilated", _default_conv),
}


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """One layer seen while running a converted model: its path, class and rule."""

    path: str
    layer: str
    rule: str
    converted: bool


_recording: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar(
    "bioflax_convert_recording", default=None)


def _convertible(module: nn.Module) -> Optional[tuple[str, Callable]]:
    for layer_class, (field, default) in _PRIMITIVES.items():
        if isinstance(module, layer_class):
            return field, default
    return None


class _Session:
    """The state of one call of a converted model: the layers it converted and, for DFA,
    the inputs that receive the projected output error."""

    def __init__(self, owner: "Converted"):
        self.owner = owner
        self.converted: list[LayerRecord] = []
        self.dfa_inputs: list[tuple[nn.Module, jax.Array]] = []
        self.seen_paths: set[str] = set()

    def _path(self, module: nn.Module) -> str:
        return "/".join(module.scope.path[len(self.owner.scope.path):])

    def _keeps_backprop(self, path: str, module: nn.Module) -> bool:
        keep = self.owner.keep_backprop
        if callable(keep):
            return bool(keep(path, module))
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in keep)

    def intercept(self, next_fun, args, kwargs, context):
        module = context.module
        primitive_field = _convertible(module)
        if (context.method_name != "__call__" or primitive_field is None
                or rules.is_rule_op(getattr(module, primitive_field[0]))):
            self._note_other(module)
            return next_fun(*args, **kwargs)
        field, default = primitive_field
        path = self._path(module)
        rule = rules.Backprop() if self._keeps_backprop(path, module) else self.owner.rule
        record = LayerRecord(path, type(module).__name__, rule.name, True)
        self.converted.append(record)
        if _recording.get() is not None:
            _recording.get().append(record)
        cls_field = f"{field}_cls"
        primitive = (getattr(module, cls_field)() if getattr(module, cls_field) is not None
                     else getattr(module, field) or default)
        op = rules.rule_op(rule, module.scope, primitive, module.param_dtype)
        layer = module.clone(parent=module.scope, **{field: op, cls_field: None})
        if isinstance(rule, rules.DirectFeedbackAlignment) and not rules.backprop_is_forced():
            args = self._dfa_input(module, primitive, args)
        return layer(*args, **kwargs)

    def _dfa_input(self, module, primitive, args):
        """Records the layer's input for the error projection and cuts backprop into it
        (not for the first converted layer, whose input needs no projection)."""
        if len(self.converted) == 1:
            return args
        x, *rest = args
        self.dfa_inputs.append((module, primitive, x))
        return (jax.lax.stop_gradient(x), *rest)

    def _note_other(self, module: nn.Module) -> None:
        recording = _recording.get()
        if recording is not None and module.scope is not None:
            path = self._path(module)
            if path not in self.seen_paths:
                self.seen_paths.add(path)
                recording.append(LayerRecord(path, type(module).__name__, "bp", False))

    def project_output_error(self, output: jax.Array) -> jax.Array:
        """``output`` unchanged; its VJP adds ``e B_lᵀ`` to every recorded DFA input."""
        if output.ndim != 2:
            raise ValueError(
                f"DFA sends the output error e to every layer, so the model's output must "
                f"have shape (batch, n_outputs); this model returns shape {output.shape}.")
        batch, n_outputs = output.shape
        inputs, matrices, projections = [], [], []
        for module, primitive, x in self.dfa_inputs:
            if x.shape[0] != batch:
                raise ValueError(
                    f"DFA: layer {self._path(module)!r} reads an input of shape {x.shape}, "
                    f"whose leading axis is not the model's batch of {batch}.")
            # a Conv layer's input by the rule's conv_feedback, any other layer's dense
            feedback = (rules.DFA_CONV_FEEDBACK[self.owner.rule.conv_feedback]
                        if isinstance(module, nn.Conv) else rules.dense_feedback)
            shape, projection = feedback(module, self._path(module), primitive, x, n_outputs)
            init = self.owner.rule.feedback_init
            scope = module.scope
            matrix = scope.variable(
                rules.FEEDBACK_COLLECTION, DFA_FEEDBACK,
                lambda s=scope, shape=shape, dt=x.dtype: init(
                    s.make_rng("params"), shape, dt)).value
            inputs.append(x)
            matrices.append(matrix)
            projections.append(projection)
        return _with_error_projection(output, inputs, matrices, projections)


def _with_error_projection(output, inputs, matrices, projections):
    """``output`` unchanged; its VJP sends the transpose of ``p_l(·, B_l)`` applied to the
    error to each input ``x_l`` (and nothing to the fixed ``B_l``)."""
    avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]

    @jax.custom_vjp
    def project(output, inputs, matrices):
        del inputs, matrices
        return output

    def fwd(output, inputs, matrices):
        del inputs
        return output, matrices

    def bwd(matrices, error):
        to_inputs = [
            jax.linear_transpose(
                lambda x, p=p, m=m: p(x, m.astype(x.dtype)), aval)(error.astype(aval.dtype))[0]
            for p, m, aval in zip(projections, matrices, avals)]
        return error, to_inputs, [jnp.zeros_like(m) for m in matrices]

    project.defvjp(fwd, bwd)
    return project(output, inputs, matrices)


class Converted(nn.Module):
    """``module`` with its ``nn.Dense`` and ``nn.Conv`` layers trained by ``rule``; made by
    :func:`convert`. Same forward pass and ``'params'`` tree as ``module``; its arguments
    (``train=`` included) are passed through."""

    module: nn.Module
    rule: rules.Rule
    keep_backprop: KeepBackprop = ()

    def setup(self):
        nn.share_scope(self, self.module)

    def __call__(self, *args, **kwargs):
        session = _Session(self)
        with nn.intercept_methods(session.intercept):
            output = self.module(*args, **kwargs)
        if not session.converted:
            raise ValueError(
                f"bioflax.convert: {type(self.module).__name__} called no nn.Dense or "
                "nn.Conv layer, so there is nothing to train with a rule.")
        if session.dfa_inputs:
            output = session.project_output_error(output)
        return output


def convert(module: nn.Module, rule: Union[str, rules.Rule], *,
            keep_backprop: KeepBackprop = (), **options: Any) -> Converted:
    """``module`` with every ``nn.Dense`` and ``nn.Conv`` inside it trained by ``rule``.

    Args:
      module: any Flax linen module (unbound).
      rule: a name of :data:`bioflax.rules.RULES` (``'bp'``, ``'fa'``, ``'kp'``, ``'dfa'``,
        ``'usf'``, ``'brsf'``, ``'frsf'``, ``'interpolate_fa_bp'``) or a ``Rule``.
      keep_backprop: layers kept on backprop: glob patterns of their paths in the
        ``'params'`` tree (``'Dense_2'``, ``'head/*'``) or a predicate ``(path, module)``.
      **options: the rule's options: ``feedback_init``, ``interpolation_factor``,
        ``conv_feedback`` (DFA).

    Layers that are not ``nn.Dense``/``nn.Conv`` keep exact backprop; :func:`summary`
    lists what was converted. Errors that only running the model can reveal (no Dense or
    Conv inside; DFA on an output that is not ``(batch, n)``) surface at ``init``.
    """
    if isinstance(rule, str):
        rule = rules.get_rule(rule, **options)
    elif options:
        raise ValueError(f"Options {sorted(options)} go with a rule name, not a Rule object.")
    if not callable(keep_backprop):
        keep_backprop = tuple([keep_backprop] if isinstance(keep_backprop, str)
                              else keep_backprop)
    return Converted(module=module, rule=rule, keep_backprop=keep_backprop)


@contextlib.contextmanager
def _record():
    records: list[LayerRecord] = []
    token = _recording.set(records)
    try:
        yield records
    finally:
        _recording.reset(token)


def layer_records(converted: Converted, *args, **kwargs) -> list[LayerRecord]:
    """Every layer of ``converted`` that owns parameters, with the rule that trains it
    (``'bp'`` for layers that keep backprop), found by tracing ``init`` on ``args``."""
    with _record() as records:
        variables = jax.eval_shape(
            lambda: converted.init(jax.random.key(0), *args, **kwargs))
    leaves = jax.tree_util.tree_flatten_with_path(variables.get("params", {}))[0]
    owners = {"/".join(key.key for key in path[:-1]) for path, _ in leaves}
    converted_paths = {r.path for r in records if r.converted}
    return [r for r in records if r.path in owners
            and (r.converted or r.path not in converted_paths)]


def summary(converted: Converted, *args, **kwargs) -> str:
    """A table of every parametrised layer and the rule that trains it (as biotorch
    prints after converting), from tracing ``init`` on ``args``."""
    records = layer_records(converted, *args, **kwargs)
    width = max([len(r.path) for r in records] + [5])
    lines = [f"{'layer':<{width}}  {'class':<12}  rule", "-" * (width + 40)]
    lines += [f"{r.path:<{width}}  {r.layer:<12}  "
              f"{r.rule if r.converted else 'bp (not a Dense or Conv)'}" for r in records]
    kept = sum(r.rule == "bp" for r in records)
    lines.append(f"{len(records) - kept} layers trained by {converted.rule.name!r}, "
                 f"{kept} by backprop.")
    return "\n".join(lines)
