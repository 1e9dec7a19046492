"""``convert(module, rule)``: any Flax model, its ``nn.Dense`` and ``nn.Conv`` layers trained
by a learning rule of :mod:`bioflax.rules`.

The converted model runs the user's module unchanged under ``nn.intercept_methods``: each
``nn.Dense`` / ``nn.Conv`` call is replaced by a clone of that layer, on the same scope,
whose ``dot_general`` / ``conv_general_dilated`` is the rule's operation. So the forward
pass is the original's exactly (for ``nn.Conv`` under ``conv_impl='xla'``), the
``'params'`` tree is the original's leaf for leaf (Kolen-Pollack adds ``feedback_kernel``
beside each ``kernel``), and fixed feedback matrices go to the ``'feedback'`` collection
at the layer's path.

A converted ``nn.Conv`` computes its convolution with the implementation ``conv_impl``
names (:data:`CONV_IMPLS`): ``'xla'`` (the default), the layer's own
``lax.conv_general_dilated``, so the forward pass is bit for bit the original's;
``'banded'``, banded matrix products (:mod:`bioflax.conv`), equal to it up to float
rounding and faster to train inside a compiled loop on XLA:CPU; ``'auto'``, banded when
``jax.default_backend()`` is ``'cpu'`` at trace time, else xla. A layer given its own
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
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from bioflax import conv as conv_lib
from bioflax import rules

DFA_FEEDBACK = "output_feedback"
KeepBackprop = Union[Sequence[str], Callable[[str, nn.Module], bool]]

# The convolutions a converted ``nn.Conv`` can run (``convert(..., conv_impl=...)``): the
# name of the implementation it resolves to at trace time, and that implementation.
# 'banded' exists because XLA:CPU's backward convolutions are slow inside ``lax.scan``
# (jax-ml/jax#12868).
CONV_IMPLS: dict[str, Callable[[], tuple[str, Callable]]] = {
    "xla": lambda: ("xla", jax.lax.conv_general_dilated),
    "banded": lambda: ("banded", conv_lib.conv_general_dilated),
    "auto": lambda: CONV_IMPLS["banded" if jax.default_backend() == "cpu" else "xla"](),
}


def _check_conv_impl(conv_impl: str) -> str:
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"Unknown conv_impl {conv_impl!r}; choose one of {list(CONV_IMPLS)}.")
    return conv_impl


# The primitive field of each convertible layer class, and the function it defaults to
# (None: the converted model's conv_impl).
_PRIMITIVES = {
    nn.Dense: ("dot_general", jax.lax.dot_general),
    nn.Conv: ("conv_general_dilated", None),
}


_RULE_OP = "_bioflax_rule_op"


def mark_rule_op(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """A wrapper of ``fn`` marked as a layer primitive that :func:`bioflax.convert` must not
    convert; ``fn`` itself stays unmarked (a shared primitive such as
    ``lax.conv_general_dilated`` must stay convertible everywhere else)."""
    def marked(*args, **kwargs):
        return fn(*args, **kwargs)
    setattr(marked, _RULE_OP, True)
    return marked


def is_rule_op(fn) -> bool:
    """Whether ``fn`` was marked by :func:`mark_rule_op`."""
    return getattr(fn, _RULE_OP, False)


def rule_op(rule: rules.Rule, scope: Any, primitive: Callable[..., jax.Array],
            param_dtype) -> Callable[..., jax.Array]:
    """A drop-in for ``lax.dot_general`` / ``lax.conv_general_dilated`` (``primitive``)
    that computes the same value and trains its kernel (the second argument) by ``rule``;
    marked by :func:`mark_rule_op`."""
    def op(lhs, rhs, *args, **kwargs):
        return rule.linear(scope, lambda x, w: primitive(x, w, *args, **kwargs), lhs, rhs,
                           param_dtype)
    return mark_rule_op(op)


def _dense_projection(x, matrix):
    return x.reshape((x.shape[0], -1)) @ matrix


def dense_feedback(module: nn.Module, path: str, primitive: Callable[..., jax.Array],
                   x: jax.Array, n_outputs: int):
    """DFA's ``B`` at any layer's input ``x``: shape ``(size of one example of x,
    n_outputs)``, an independent random projection at every position; ``p(x, B) = flat(x) @
    B``. Returns ``(shape of B, p)``; ``module``, ``path`` and ``primitive`` are unused."""
    del module, path, primitive
    return (math.prod(x.shape[1:]), n_outputs), _dense_projection


def shared_kernel_feedback(module: nn.Conv, path: str, primitive: Callable[..., jax.Array],
                           x: jax.Array, n_outputs: int):
    """DFA's ``B`` at a Conv layer's input as biotorch's DFA ``Conv2d`` has it: a kernel of
    shape ``(kh, kw, C, n_outputs)`` with the layer's strides, padding and dilation, and
    ``p(x, B) = Σ_positions conv(x, B)``, whose transpose sends the transposed convolution
    of ``e`` repeated over the output map. Returns ``(shape of B, p)``."""
    if module.feature_group_count != 1:
        raise ValueError(
            f"DFA with conv_feedback='shared_kernel': layer {path!r} has "
            f"feature_group_count={module.feature_group_count}; a kernel from its "
            f"{x.shape[-1]} input channels to the {n_outputs} outputs needs 1 "
            "(or use conv_feedback='dense').")
    kernel_size = ((module.kernel_size,) if isinstance(module.kernel_size, int)
                   else tuple(module.kernel_size))

    bare = module.clone(parent=None, features=n_outputs, use_bias=False,
                        conv_general_dilated=mark_rule_op(primitive),  # never converted
                        conv_general_dilated_cls=None)

    def projection(x, kernel):
        y = bare.apply({"params": {"kernel": kernel}}, x)
        return jnp.sum(y, axis=tuple(range(1, y.ndim - 1)))

    return (*kernel_size, x.shape[-1], n_outputs), projection


# How DFA's B at the input of a Conv layer is shaped (a Dense layer's input always takes
# dense_feedback): each builds ``(shape of B, p)`` from ``(module, path, primitive, x,
# n_outputs)``, the error reaching ``x`` being the transpose of ``p(·, B)`` applied to ``e``.
DFA_CONV_FEEDBACK: dict[str, Callable[..., tuple]] = {
    "dense": dense_feedback,
    "shared_kernel": shared_kernel_feedback,
}


assert tuple(DFA_CONV_FEEDBACK) == rules.DFA_CONV_FEEDBACK_KINDS


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """One layer seen while running a converted model: its path, class and rule."""

    path: str
    layer: str
    rule: str
    converted: bool
    conv_impl: Optional[str] = None  # converted Conv layers: 'xla', 'banded' or 'custom'


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
        self.dfa_inputs: list[tuple[nn.Module, Callable, jax.Array]] = []

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
                or is_rule_op(getattr(module, primitive_field[0]))):
            return next_fun(*args, **kwargs)
        field, default = primitive_field
        path = self._path(module)
        rule = rules.Backprop() if self._keeps_backprop(path, module) else self.owner.rule
        cls_field = f"{field}_cls"
        impl_name = None
        if getattr(module, cls_field) is not None:
            primitive, impl_name = getattr(module, cls_field)(), "custom"
        elif getattr(module, field) is not None:
            primitive, impl_name = getattr(module, field), "custom"
        elif default is None:
            impl_name, primitive = CONV_IMPLS[self.owner.conv_impl]()
        else:
            primitive = default
        if not isinstance(module, nn.Conv):
            impl_name = None
        record = LayerRecord(path, type(module).__name__, rule.name, True, impl_name)
        self.converted.append(record)
        if _recording.get() is not None:
            _recording.get().append(record)
        op = rule_op(rule, module.scope, primitive, module.param_dtype)
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
            feedback = (DFA_CONV_FEEDBACK[self.owner.rule.conv_feedback]
                        if isinstance(module, nn.Conv) else dense_feedback)
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
        return with_error_projection(output, inputs, matrices, projections)


def with_error_projection(output, inputs, matrices, projections):
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
    conv_impl: str = "xla"

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
            keep_backprop: KeepBackprop = (), conv_impl: str = "xla",
            **options: Any) -> Converted:
    """``module`` with every ``nn.Dense`` and ``nn.Conv`` inside it trained by ``rule``.

    Args:
      module: any Flax linen module (unbound).
      rule: a name of :data:`bioflax.rules.RULES` (``'bp'``, ``'fa'``, ``'kp'``, ``'dfa'``,
        ``'usf'``, ``'brsf'``, ``'frsf'``, ``'interpolate_fa_bp'``) or a ``Rule``.
      keep_backprop: layers kept on backprop: glob patterns of their paths in the
        ``'params'`` tree (``'Dense_2'``, ``'head/*'``) or a predicate ``(path, module)``.
      conv_impl: the convolution of converted ``nn.Conv`` layers, a key of
        :data:`CONV_IMPLS`: ``'xla'`` (``lax.conv_general_dilated``), ``'banded'``
        (:func:`bioflax.conv.conv_general_dilated`) or ``'auto'`` (banded on the CPU
        backend, else xla). Defaults to ``'xla'`` so that the forward pass is the
        original's bit for bit unless a faster one is asked for.
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
    return Converted(module=module, rule=rule, keep_backprop=keep_backprop,
                     conv_impl=_check_conv_impl(conv_impl))


@contextlib.contextmanager
def _record():
    records: list[LayerRecord] = []
    token = _recording.set(records)
    try:
        yield records
    finally:
        _recording.reset(token)


def layer_records(module: nn.Module, *args, **kwargs) -> list[LayerRecord]:
    """Every layer of ``module`` that owns parameters, in the order the forward pass first
    calls it, with the rule that trains it (``'bp'`` for layers that keep backprop), found
    by tracing ``init`` on ``args``: the one call-order tracer of bioflax. ``module`` may be a
    :class:`Converted` model (whose sessions add the converted layers) or any other (whose
    layers are then all recorded as not converted)."""

    def record_any(next_fun, call_args, call_kwargs, context):
        layer = context.module
        if context.method_name == "__call__" and layer.scope is not None:
            path = "/".join(layer.scope.path)
            if path not in seen:
                seen.add(path)
                records.append(LayerRecord(path, type(layer).__name__, "bp", False))
        return next_fun(*call_args, **call_kwargs)

    seen: set[str] = set()
    with _record() as records:
        with nn.intercept_methods(record_any):
            variables = jax.eval_shape(
                lambda: module.init(jax.random.key(0), *args, **kwargs))
    leaves = jax.tree_util.tree_flatten_with_path(variables.get("params", {}))[0]
    owners = {"/".join(key.key for key in path[:-1]) for path, _ in leaves}
    converted_paths = {r.path for r in records if r.converted}
    return [r for r in records if r.path in owners
            and (r.converted or r.path not in converted_paths)]


def summary(converted: Converted, *args, **kwargs) -> str:
    """A table of every parametrised layer and the rule that trains it (as biotorch
    prints after converting), from tracing ``init`` on ``args``; a converted Conv layer's
    class names its convolution (``Conv (xla)``, ``Conv (banded)``, or ``Conv (custom)``
    for a layer given its own)."""
    records = layer_records(converted, *args, **kwargs)
    width = max([len(r.path) for r in records] + [5])
    classes = [r.layer if r.conv_impl is None else f"{r.layer} ({r.conv_impl})"
               for r in records]
    class_width = max([len(c) for c in classes] + [12])
    lines = [f"{'layer':<{width}}  {'class':<{class_width}}  rule",
             "-" * (width + class_width + 28)]
    lines += [f"{r.path:<{width}}  {c:<{class_width}}  "
              f"{r.rule if r.converted else 'bp (not a Dense or Conv)'}"
              for r, c in zip(records, classes)]
    kept = sum(r.rule == "bp" for r in records)
    lines.append(f"{len(records) - kept} layers trained by {converted.rule.name!r}, "
                 f"{kept} by backprop.")
    return "\n".join(lines)
