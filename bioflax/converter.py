"""``convert(module, rule)``: any Flax model, its linear layers (``nn.Dense``, ``nn.Conv``,
``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Embed.attend``) trained by a learning rule of
:mod:`bioflax.rules`.

The converted model runs the user's module unchanged under ``nn.intercept_methods``: each
``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Conv`` call is replaced by a clone of that
layer, on the same scope, whose ``dot_general`` / ``conv_general_dilated`` is the rule's
operation; so the query, key, value and output projections of
``nn.MultiHeadDotProductAttention`` / ``nn.SelfAttention`` (DenseGeneral layers) convert
too. ``nn.Einsum`` has no such field: it runs as :class:`RuleEinsum`, flax's computation
with the same parameters on the same scope, its einsum under the rule.
``Embed.attend(q) = q Eᵀ`` (a tied output projection, a weight-transport path) trains
like a Dense layer of kernel ``Eᵀ``: its backward kernel has the embedding's shape
(``feedback_kernel`` of the Embed; under KP it receives only attend's ``dW``, while ``E``
also receives the lookup's gradient). The lookup ``Embed(tokens)`` keeps its ordinary
gradient: it is the first layer of its path, no signal goes below it. The rule's
``fan_in`` (uSF's ``1/√fan_in``) is the size of the kernel axes the layer contracts with
its input (a DenseGeneral's ``axis`` dimensions, not its ``batch_dims``; an Einsum's kernel
axes shared with its input and not its output). So the forward pass is the original's
exactly (for ``nn.Conv`` under ``conv_impl='xla'``), the ``'params'`` tree is the
original's leaf for leaf (Kolen-Pollack adds ``feedback_kernel`` beside each ``kernel``
and ``embedding`` it trains), and fixed feedback matrices go to the ``'feedback'``
collection at the layer's path.

A converted ``nn.Conv`` computes its convolution with the implementation ``conv_impl``
names (:data:`CONV_IMPLS`): ``'xla'`` (the default), the layer's own
``lax.conv_general_dilated``, so the forward pass is bit for bit the original's;
``'banded'``, banded matrix products (:mod:`bioflax.conv`), equal to it up to float
rounding and faster to train inside a compiled loop on XLA:CPU; ``'auto'``, banded when
``jax.default_backend()`` is ``'cpu'`` at trace time, else xla. A layer given its own
``conv_general_dilated`` keeps it.

Everything else — BatchNorm, LayerNorm, RMSNorm, pooling, activations, the
softmax(QKᵀ)V core of attention, dropout, residual additions, embedding lookups, a
module's own parameters, and layers of other classes (``ConvTranspose``, ``ConvLocal``) —
keeps exact backprop: it passes on whatever signal reaches it from above.

**DFA through any graph.** With ``rule='dfa'`` every converted layer except the first (in
call order) reads its input ``x_l`` through ``stop_gradient``, and the model's output ``y``
passes through an identity whose VJP sends ``e B_lᵀ`` (``e = ∂L/∂y``, reshaped to
``x_l``'s shape) to every such ``x_l``. For an output of shape ``(batch, n_outputs)``,
``B_l`` has shape ``(size of one example of x_l, n_outputs)``; for an output of shape
``(batch, ..., n_outputs)`` (a sequence model) whose leading axes are also ``x_l``'s,
DFA is token-wise (Launay et al. 2020): ``B_l`` has shape ``(features of x_l, n_outputs)``
(the size of ``x_l``'s other axes) and sends the error at each position to the same
position of ``x_l``. With the rule's ``position_feedback='shared'``, the axes of
``x_l`` that the output lacks and the layer does not contract (a ViT's tokens; a Conv
input's rows and columns) are positions too, with one ``B_l`` of shape (size of the
contracted axes, ``n_outputs``) for all of them: the features are what the layer reads at
one position (a Dense or Conv layer's channels, a DenseGeneral's ``axis`` dimensions, such
as the heads × depth of attention's output projection). ``B_l`` is fixed, drawn with
``feedback_init`` (LeCun normal: std ``1/√size``) and stored as ``output_feedback`` in the
``'feedback'`` collection of the layer that reads ``x_l``. Autodiff carries ``e B_lᵀ``
through the activation, pooling or reshape below to the layer that produced ``x_l``: its
``δ = φ'(a) ⊙ (e B_lᵀ)``, Nøkland's
DFA. The output layer's input ``x_L`` receives ``e B_Lᵀ`` like every other, and the output
layer itself is trained by its true gradient ``e`` (``dW_L = x_Lᵀ e``), as in every DFA. A
tensor read by several converted layers receives the sum of their projections, plus what
reaches it through paths without converted layers (an identity shortcut). The first
converted layer's input (usually the data) receives no projection: trainable layers
below it that are not converted (an embedding lookup, position embeddings) receive
backprop through it; make such a layer a feedback point to give it the projected error
instead. A layer input whose leading axes are not the output's, or an output with fewer
than two axes, raises a ``ValueError`` at ``init``.

**Per-block DFA** (Launay et al.'s "macro" DFA): ``convert(model, 'dfa',
feedback_points=['block*'])``, glob patterns of module paths. The output of each
matched module (a single array) receives ``e B_bᵀ`` (``B_b`` shaped as above, stored as
``output_feedback`` at that module's path) and is passed on through ``stop_gradient``,
so nothing from above reaches it; everything inside it trains by exact backprop of that
signal, which goes on below the module's input to what produced it unless that is
another feedback point. Converted layers outside every feedback point keep per-layer DFA
(the classifier head: its true gradient ``e``). A pattern that matches no module raises a
``ValueError`` naming the module paths.

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
import functools
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import opt_einsum
from flax import linen as nn
from flax import nnx
from flax.linen import module as flax_module

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


# The primitive field of each convertible layer class, the function it defaults to
# (None: the converted model's conv_impl), and the axes of its input it contracts.
_PRIMITIVES: dict[type, tuple[str, Optional[Callable], Callable]] = {
    nn.Dense: ("dot_general", jax.lax.dot_general, lambda module, x: last_axis(x)),
    nn.DenseGeneral: ("dot_general", jax.lax.dot_general,
                      lambda module, x: general_axes(module.axis, x)),
    nn.Conv: ("conv_general_dilated", None, lambda module, x: last_axis(x)),
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


def dot_general_fan_in(rhs, args, kwargs) -> int:
    """The inputs per output unit of ``lax.dot_general(lhs, rhs, dimension_numbers)``: the
    size of ``rhs``'s contracting axes (a DenseGeneral's ``axis`` dimensions; not its
    ``batch_dims``)."""
    dimension_numbers = args[0] if args else kwargs["dimension_numbers"]
    (_, rhs_contracting), _ = dimension_numbers
    return math.prod(rhs.shape[axis] for axis in rhs_contracting)


def einsum_axes(einsum_str: str, x: jax.Array, kernel_shape) -> tuple[int, ...]:
    """The axes of ``x`` that ``einsum(einsum_str, x, kernel)`` contracts with the
    kernel (shared with it, absent from the result)."""
    kernel = jax.ShapeDtypeStruct(tuple(kernel_shape), x.dtype)
    operands, result, _ = opt_einsum.parser.parse_einsum_input((einsum_str, x, kernel))
    lhs, rhs = operands.split(",")
    return tuple(i for i, c in enumerate(lhs) if c in rhs and c not in result)


def einsum_fan_in(einsum_str: str, x, kernel) -> int:
    """The inputs per output unit of ``einsum(einsum_str, x, kernel)``: the size of the
    axes it contracts."""
    return math.prod(x.shape[a] for a in einsum_axes(einsum_str, x, kernel.shape))


def rule_op(rule: rules.Rule, store: rules.Store, primitive: Callable[..., jax.Array],
            param_dtype, fan_in_of: Optional[Callable] = None) -> Callable[..., jax.Array]:
    """A drop-in for ``lax.dot_general`` / ``lax.conv_general_dilated`` (``primitive``)
    that computes the same value and trains its kernel (the second argument) by ``rule``;
    marked by :func:`mark_rule_op`. ``fan_in_of(rhs, args, kwargs)`` counts the kernel's
    contracted inputs (``None``: :func:`bioflax.rules.fan_in`, right for Dense and Conv)."""
    def op(lhs, rhs, *args, **kwargs):
        fan_in = None if fan_in_of is None else fan_in_of(rhs, args, kwargs)
        return rule.linear(store, lambda x, w: primitive(x, w, *args, **kwargs), lhs, rhs,
                           param_dtype, fan_in)
    return mark_rule_op(op)


class RuleEinsum(nn.Einsum):
    """``nn.Einsum`` computed as flax 0.12's (same parameters, initialisers, dtype
    promotion and bias) with its einsum trained by ``rule``: flax's Einsum has no
    ``dot_general`` field to swap, so the converter runs this clone on the layer's scope."""

    rule: Any = None

    @nn.compact
    def __call__(self, inputs, einsum_str: Optional[str] = None):
        einsum_str = flax_module.merge_param("einsum_str", self.einsum_str, einsum_str)
        einsum_str = einsum_str.replace(" ", "")
        if "->" not in einsum_str:
            raise ValueError('`einsum_str` equation must be explicit and include "->".')
        if einsum_str.count(",") != 1:
            raise ValueError("`einsum_str` equation must have exactly two operands and "
                             "therefore, exactly one comma character, instead of "
                             f"{einsum_str.count(',')}")
        kernel = self.param("kernel", self.kernel_init, self.shape, self.param_dtype)
        if self.use_bias:
            bias_shape, broadcast_shape = self._get_bias_shape(einsum_str, inputs, kernel)
            bias = self.param("bias", self.bias_init, bias_shape, self.param_dtype)
        else:
            bias = None
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)

        def einsum(x, w):
            return jnp.einsum(einsum_str, x, w, precision=self.precision,
                              preferred_element_type=self.preferred_element_type)

        y = self.rule.linear(rules.LinenStore(self.scope), einsum, inputs, kernel,
                             self.param_dtype, einsum_fan_in(einsum_str, inputs, kernel))
        if bias is not None:
            y += jnp.reshape(bias, broadcast_shape)
        return y


def attend(query, embedding):
    """``Embed.attend``'s map: ``query @ embeddingᵀ``."""
    return jnp.dot(query, embedding.T)


def _dense_projection(x, matrix):
    return x.reshape((x.shape[0], -1)) @ matrix


def positionwise_feedback(x: jax.Array, n_outputs: int, n_position_axes: int,
                          features: tuple[int, ...]):
    """DFA's ``B`` at an input ``x`` for an output of shape ``(batch, ..., n_outputs)``
    whose ``n_position_axes`` leading axes (batch included) are ``x``'s: shape (size of
    ``x``'s other axes, ``n_outputs``), the same ``B`` at each of those positions;
    ``p(x, B) = x[lead, rest] @ B``, so the error at each position reaches the same
    position of ``x`` (Launay et al. 2020). With one leading axis it is
    :func:`dense_feedback`. ``features`` (the axes the layer contracts) is unused: every
    axis the output lacks gets its own entries of ``B``. Returns ``(shape of B, p)``."""
    del features
    lead = n_position_axes

    def projection(x, matrix):
        return x.reshape(x.shape[:lead] + (-1,)) @ matrix

    return (math.prod(x.shape[lead:]), n_outputs), projection


def shared_position_feedback(x: jax.Array, n_outputs: int, n_position_axes: int,
                             features: tuple[int, ...]):
    """As :func:`positionwise_feedback`, but the axes of ``x`` beyond the leading ones
    that the layer does not contract (``features``: the axes it does, non-negative) are
    positions too, with one ``B`` of shape (size of the contracted axes, ``n_outputs``)
    for all of them: ``p(x, B) = (Σ_positions x) @ B``, whose transpose sends ``e Bᵀ`` to
    every position (TinyDFA's repeated projection). Returns ``(shape of B, p)``."""
    lead = n_position_axes
    positions = tuple(a for a in range(lead, x.ndim) if a not in features)
    size = math.prod(x.shape[a] for a in range(lead, x.ndim) if a in features)

    def projection(x, matrix):
        return x.sum(axis=positions).reshape(x.shape[:lead] + (-1,)) @ matrix

    return (size, n_outputs), projection


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


# How DFA's ``B`` treats the positions of an input that the output lacks
# (``DirectFeedbackAlignment.position_feedback``): each builds ``(shape of B, p)`` from
# ``(x, n_outputs, n_position_axes, features)``, ``features`` being the axes of ``x`` that
# the layer reading it contracts.
DFA_POSITION_FEEDBACK: dict[str, Callable[..., tuple]] = {
    "independent": positionwise_feedback,
    "shared": shared_position_feedback,
}
assert tuple(DFA_POSITION_FEEDBACK) == rules.DFA_POSITION_FEEDBACK_KINDS


def position_feedback(rule: rules.DirectFeedbackAlignment,
                      features: tuple[int, ...]) -> Callable[..., tuple]:
    """The entry of :data:`DFA_POSITION_FEEDBACK` that ``rule`` names, for an input whose
    axes ``features`` (non-negative) the layer reading it contracts:
    ``(x, n_outputs, n_position_axes) → (shape of B, p)``."""
    return functools.partial(DFA_POSITION_FEEDBACK[rule.position_feedback],
                             features=features)


def last_axis(x: jax.Array) -> tuple[int, ...]:
    """The features of an input read by a Dense or Conv layer (its channels) or of a
    feedback point's output: its last axis."""
    return (x.ndim - 1,)


def general_axes(axis: Union[int, Sequence[int]], x: jax.Array) -> tuple[int, ...]:
    """The axes of ``x`` that a DenseGeneral (LinearGeneral) with ``axis`` contracts."""
    return tuple(a % x.ndim for a in (axis if isinstance(axis, Sequence) else (axis,)))


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


def _convertible(module: nn.Module) -> Optional[tuple[str, Optional[Callable], Callable]]:
    for layer_class, entry in _PRIMITIVES.items():
        if isinstance(module, layer_class):
            return entry
    return None


class _Session:
    """The state of one call of a converted model: the layers it converted and, for DFA,
    the inputs that receive the projected output error."""

    def __init__(self, owner: "Converted"):
        self.owner = owner
        self.converted: list[LayerRecord] = []
        # (module, primitive, tensor, is a feedback point's output, its contracted axes)
        self.dfa_inputs: list[tuple[nn.Module, Optional[Callable], jax.Array, bool,
                                    tuple[int, ...]]] = []
        self.paths: list[str] = []  # every module called, for feedback_points' errors
        self.inside_point: list[str] = []  # the feedback point being run, if any

    def _path(self, module: nn.Module) -> str:
        return "/".join(module.scope.path[len(self.owner.scope.path):])

    def _dfa_active(self) -> bool:
        return (isinstance(self.owner.rule, rules.DirectFeedbackAlignment)
                and not rules.backprop_is_forced())

    def _layer_rule(self, path: str, module: nn.Module) -> tuple[rules.Rule, str]:
        """The rule that trains a layer and its name in the summary."""
        if keeps_backprop(self.owner.keep_backprop, path, module):
            return rules.Backprop(), "bp"
        if self.inside_point:
            return rules.Backprop(), f"dfa (backprop inside {self.inside_point[0]!r})"
        return self.owner.rule, self.owner.rule.name

    def _add_record(self, record: LayerRecord):
        self.converted.append(record)
        if _recording.get() is not None:
            _recording.get().append(record)

    def intercept(self, next_fun, args, kwargs, context):
        module = context.module
        attend = isinstance(module, nn.Embed) and context.method_name == "attend"
        if (context.method_name != "__call__" and not attend) or isinstance(module, RuleEinsum):
            return next_fun(*args, **kwargs)
        primitive_field = _convertible(module)
        if primitive_field is not None and is_rule_op(getattr(module, primitive_field[0])):
            return next_fun(*args, **kwargs)
        path = self._path(module)
        if not attend and path and path not in self.paths:
            self.paths.append(path)
        if (not attend and path and self.owner.feedback_points and not self.inside_point
                and self._dfa_active() and matches_any(path, self.owner.feedback_points)):
            return self._feedback_point(next_fun, args, kwargs, module, path)
        if attend:
            return self._attend(module, path, args, kwargs)
        if isinstance(module, nn.Einsum):
            return self._einsum(module, path, args, kwargs)
        if primitive_field is None:
            return next_fun(*args, **kwargs)
        field, default, features = primitive_field
        rule, rule_name = self._layer_rule(path, module)
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
        self._add_record(LayerRecord(path, type(module).__name__, rule_name, True, impl_name))
        op = rule_op(rule, rules.LinenStore(module.scope), primitive, module.param_dtype,
                     dot_general_fan_in if field == "dot_general" else None)
        layer = module.clone(parent=module.scope, **{field: op, cls_field: None})
        if isinstance(rule, rules.DirectFeedbackAlignment) and self._dfa_active():
            args = self._dfa_input(module, primitive, args, features(module, args[0]))
        return layer(*args, **kwargs)

    def _einsum(self, module: nn.Einsum, path: str, args, kwargs):
        """An ``nn.Einsum`` run as :class:`RuleEinsum` on its own scope."""
        rule, rule_name = self._layer_rule(path, module)
        self._add_record(LayerRecord(path, type(module).__name__, rule_name, True))
        fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(nn.Einsum)
                  if f.init and f.name not in ("parent", "name")}
        layer = RuleEinsum(**fields, rule=rule, parent=module.scope)
        if isinstance(rule, rules.DirectFeedbackAlignment) and self._dfa_active():
            x, *rest = args
            einsum_str = nn.merge_param("einsum_str", module.einsum_str,
                                        rest[0] if rest else kwargs.get("einsum_str"))
            args = self._dfa_input(module, None, args,
                                   einsum_axes(einsum_str, x, module.shape))
        return layer(*args, **kwargs)

    def _attend(self, module: nn.Embed, path: str, args, kwargs):
        """``Embed.attend(query) = query @ embeddingᵀ``, a tied output projection, trained
        by the rule like a Dense layer whose kernel is ``embeddingᵀ``: its backward kernel
        has the embedding's shape (``feedback_kernel`` of the Embed) and the query
        receives ``δ B``; the embedding gets this path's ``dW`` plus the lookup's."""
        rule, rule_name = self._layer_rule(path, module)
        self._add_record(LayerRecord(path, "Embed.attend", rule_name, True))
        (query,) = args or (kwargs["query"],)
        query, embedding = module.promote_dtype(query, module.embedding, dtype=module.dtype)
        if isinstance(rule, rules.DirectFeedbackAlignment) and self._dfa_active():
            (query,) = self._dfa_input(module, None, (query,), last_axis(query))
        return rule.linear(rules.LinenStore(module.scope), attend, query, embedding,
                           module.param_dtype, embedding.shape[-1])

    def _feedback_point(self, next_fun, args, kwargs, module: nn.Module, path: str):
        """Runs a module matched by ``feedback_points`` with backprop inside it; its output
        is recorded to receive the projected error and returned through ``stop_gradient``,
        so nothing above reaches it but that projection."""
        output = run_feedback_point(self.inside_point, path, lambda: next_fun(*args, **kwargs))
        self.dfa_inputs.append((module, None, output, True, last_axis(output)))
        return jax.lax.stop_gradient(output)

    def _dfa_input(self, module, primitive, args, features: tuple[int, ...]):
        """Records the layer's input (whose axes ``features`` the layer contracts) for the
        error projection and cuts backprop into it (not for the first converted layer,
        whose input needs no projection)."""
        if len(self.converted) == 1:
            return args
        x, *rest = args
        self.dfa_inputs.append((module, primitive, x, False, features))
        return (jax.lax.stop_gradient(x), *rest)

    def project_output_error(self, output: jax.Array) -> jax.Array:
        """``output`` unchanged; its VJP adds ``e B_lᵀ`` to every recorded DFA input."""
        return project_output_error(output, [
            DfaInput(self._path(module), x, is_point, rules.LinenStore(module.scope),
                     self._feedback(module, primitive, is_point, features))
            for module, primitive, x, is_point, features in self.dfa_inputs], self.owner.rule)

    def _feedback(self, module: nn.Module, primitive, is_point: bool,
                  features: tuple[int, ...]) -> Callable:
        """How DFA's ``B`` at this input is shaped: ``(x, n_outputs, n_position_axes) →
        (shape of B, p)``."""
        if not (isinstance(module, nn.Conv) and not is_point
                and self.owner.rule.conv_feedback == "shared_kernel"):
            return position_feedback(self.owner.rule, features)

        def shared_kernel(x, n_outputs, n_position_axes):
            if n_position_axes > 1:
                raise ValueError(
                    "DFA with conv_feedback='shared_kernel' needs a (batch, n_outputs) "
                    "output; this model's has more axes (use conv_feedback='dense').")
            return shared_kernel_feedback(module, self._path(module), primitive, x, n_outputs)
        return shared_kernel


def run_feedback_point(inside_point: list, path: str, run: Callable[[], Any]) -> jax.Array:
    """``run()``, the module at the feedback point ``path``, with ``path`` on
    ``inside_point`` meanwhile; ValueError unless it returns one array."""
    inside_point.append(path)
    try:
        output = run()
    finally:
        inside_point.pop()
    if not isinstance(output, jax.Array):
        raise ValueError(
            f"DFA feedback point {path!r} returns {type(output).__name__}; a feedback "
            "point must return one array, which receives the projected error.")
    return output


@dataclasses.dataclass(frozen=True)
class DfaInput:
    """A tensor that receives DFA's projected error: a converted layer's input or a
    feedback point's output, at ``path``, its ``B`` kept in ``store`` and shaped by
    ``feedback(x, n_outputs, n_position_axes) → (shape of B, p)``."""

    path: str
    x: jax.Array
    is_point: bool
    store: rules.Store
    feedback: Callable[[jax.Array, int, int], tuple]


def project_output_error(output: jax.Array, inputs: Sequence[DfaInput],
                         rule: rules.DirectFeedbackAlignment) -> jax.Array:
    """``output`` unchanged; its VJP adds ``e B_lᵀ`` to every input of ``inputs``, at each
    position of a ``(batch, ..., n_outputs)`` output (token-wise); each ``B_l`` is the
    fixed variable ``output_feedback`` of its store, drawn with ``rule.feedback_init``."""
    if not isinstance(output, jax.Array) or output.ndim < 2:
        raise ValueError(
            f"DFA sends the output error e to every layer, so the model's output must "
            f"have shape (batch, n_outputs) or (batch, ..., n_outputs); this model "
            f"returns {getattr(output, 'shape', type(output).__name__)}.")
    lead, n_outputs = output.shape[:-1], output.shape[-1]
    matrices, projections = [], []
    for item in inputs:
        if item.x.shape[:len(lead)] != lead:
            what = "feedback point" if item.is_point else "layer"
            reads = "returns" if item.is_point else "reads an input of"
            raise ValueError(
                f"DFA: {what} {item.path!r} {reads} shape {item.x.shape}, whose "
                f"leading axes are not those of the model's output {output.shape} "
                f"(all but its last, {lead}): the error at each position of the output "
                "goes to the same position of every layer's input, so they must match.")
        shape, projection = item.feedback(item.x, n_outputs, len(lead))
        matrices.append(item.store.fixed(DFA_FEEDBACK, rule.feedback_init, shape,
                                         item.x.dtype))
        projections.append(projection)
    return with_error_projection(output, [item.x for item in inputs], matrices, projections,
                                 rule.projected, rule.source(output))


def with_error_projection(output, inputs, matrices, projections,
                          projected: Callable = lambda error, source: error, source=None):
    """``output`` unchanged; its VJP sends the transpose of ``p_l(·, B_l)`` applied to
    ``projected(error, source)`` (the error itself by default) to each input ``x_l``, and
    nothing to the fixed ``B_l`` or to ``source``."""
    avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]

    @jax.custom_vjp
    def project(output, inputs, matrices, source):
        del inputs, matrices, source
        return output

    def fwd(output, inputs, matrices, source):
        del inputs
        return output, (matrices, source)

    def bwd(residuals, error):
        matrices, source = residuals
        signal = projected(error, source)
        to_inputs = [
            jax.linear_transpose(
                lambda x, p=p, m=m: p(x, m.astype(x.dtype)), aval)(signal.astype(aval.dtype))[0]
            for p, m, aval in zip(projections, matrices, avals)]
        return (error, to_inputs, [jnp.zeros_like(m) for m in matrices],
                jax.tree.map(jnp.zeros_like, source))

    project.defvjp(fwd, bwd)
    return project(output, inputs, matrices, source)


class Converted(nn.Module):
    """``module`` with its linear layers (Dense, DenseGeneral, Conv, Einsum, Embed.attend)
    trained by ``rule``; made by :func:`convert`. Same forward pass and ``'params'`` tree
    as ``module``; its arguments (``train=`` included) are passed through."""

    module: nn.Module
    rule: rules.Rule
    keep_backprop: KeepBackprop = ()
    conv_impl: str = "xla"
    feedback_points: tuple[str, ...] = ()

    def setup(self):
        nn.share_scope(self, self.module)

    def __call__(self, *args, **kwargs):
        session = _Session(self)
        with nn.intercept_methods(session.intercept):
            output = self.module(*args, **kwargs)
        if not session.converted:
            raise ValueError(
                f"bioflax.convert: {type(self.module).__name__} called no nn.Dense or "
                "nn.Conv layer (nor DenseGeneral, Einsum or Embed.attend), so there is "
                "nothing to train with a rule.")
        check_patterns("feedback point", self.feedback_points, session.paths)
        if not callable(self.keep_backprop):
            check_patterns("keep_backprop pattern", self.keep_backprop,
                           [record.path for record in session.converted], "converted layer")
        if session.dfa_inputs:
            output = session.project_output_error(output)
        return output


def matches_any(path: str, patterns: Sequence[str]) -> bool:
    """Whether the module path ``path`` matches one of the glob ``patterns``."""
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def keeps_backprop(keep: KeepBackprop, path: str, module: Any) -> bool:
    """Whether ``keep_backprop`` (glob patterns, or a predicate of ``(path, module)``)
    leaves the layer ``module`` at ``path`` on backprop."""
    return bool(keep(path, module)) if callable(keep) else matches_any(path, keep)


def check_patterns(kind: str, patterns: Sequence[str], paths: Sequence[str],
                   what: str = "module") -> None:
    """ValueError naming the first of the glob ``patterns`` that matches none of ``paths``
    (those of each ``what``)."""
    for pattern in patterns:
        if not any(matches_any(path, [pattern]) for path in paths):
            raise ValueError(f"bioflax.convert: {kind} {pattern!r} matches no {what}; the "
                             f"{what} paths are {list(dict.fromkeys(paths))}.")


def convert(module: Union[nn.Module, nnx.Module], rule: Union[str, rules.Rule], *,
            keep_backprop: KeepBackprop = (), conv_impl: str = "xla",
            feedback_points: Union[str, Sequence[str]] = (),
            rngs: Optional[nnx.Rngs] = None, example: Any = None, **options: Any):
    """``module`` with every ``nn.Dense``, ``nn.Conv``, ``nn.DenseGeneral`` (so every
    projection of ``nn.MultiHeadDotProductAttention``), ``nn.Einsum`` and ``nn.Embed.attend``
    inside it trained by ``rule``; for a Flax NNX model, every ``nnx.Linear``,
    ``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.Einsum`` and ``nnx.Embed.attend``
    (:mod:`bioflax.nnx_converter`).

    Args:
      module: any Flax linen module (unbound), returning a :class:`Converted` module; or an
        ``nnx.Module``, returning a :class:`bioflax.nnx_converter.Converted` copy of it.
      rule: a name of :data:`bioflax.rules.RULES` (``'bp'``, ``'fa'``, ``'kp'``, ``'dfa'``,
        ``'usf'``, ``'brsf'``, ``'frsf'``, ``'interpolate_fa_bp'``) or a ``Rule``.
      keep_backprop: layers kept on backprop: glob patterns of their paths in the
        ``'params'`` tree (``'Dense_2'``, ``'head/*'``; one that matches no converted layer
        is a ``ValueError``) or a predicate ``(path, module)``.
      conv_impl: the convolution of converted ``nn.Conv`` layers, a key of
        :data:`CONV_IMPLS`: ``'xla'`` (``lax.conv_general_dilated``), ``'banded'``
        (:func:`bioflax.conv.conv_general_dilated`) or ``'auto'`` (banded on the CPU
        backend, else xla). Defaults to ``'xla'`` so that the forward pass is the
        original's bit for bit unless a faster one is asked for.
      feedback_points: DFA only: glob patterns of module paths (``'block*'``) whose
        outputs receive the projected error, everything inside them trained by backprop
        of it (Launay et al.'s per-block DFA); converted layers outside them keep
        per-layer DFA. A pattern that matches no module raises a ``ValueError`` at
        ``init``.
      rngs: NNX only: the ``nnx.Rngs`` that draws feedback weights (stream
        ``'feedback'``, else its default), needed by every rule with random ``B``; a Linen
        model draws them at ``init``.
      example: NNX with DFA only: a batch of inputs (or a tuple of the model's arguments)
        that shapes DFA's ``B_l``; a Linen model shapes them at ``init``.
      **options: the rule's options: ``feedback_init``, ``interpolation_factor``,
        ``conv_feedback`` (DFA).

    Other layers keep exact backprop (the lookup of ``nn.Embed`` too: the first layer of
    its path); :func:`summary` lists what was converted. Errors that only running the
    model can reveal (nothing to convert inside; DFA on an output whose leading axes are
    not a layer input's) surface at ``init``.
    """
    if isinstance(rule, str):
        rule = rules.get_rule(rule, **options)
    elif options:
        raise ValueError(f"Options {sorted(options)} go with a rule name, not a Rule object.")
    if not callable(keep_backprop):
        keep_backprop = tuple([keep_backprop] if isinstance(keep_backprop, str)
                              else keep_backprop)
    feedback_points = tuple([feedback_points] if isinstance(feedback_points, str)
                            else feedback_points)
    if feedback_points and not isinstance(rule, rules.DirectFeedbackAlignment):
        raise ValueError(f"feedback_points are DFA's (per-block DFA); rule {rule.name!r} "
                         "takes none.")
    _check_conv_impl(conv_impl)
    if isinstance(module, nnx.Module):
        from bioflax import nnx_converter  # it builds on this module
        return nnx_converter.convert(module, rule, rngs=rngs, example=example,
                                     keep_backprop=keep_backprop, conv_impl=conv_impl,
                                     feedback_points=feedback_points)
    if not isinstance(module, nn.Module):
        raise TypeError(f"bioflax.convert takes a flax.linen.Module or a flax.nnx.Module, "
                        f"not {type(module).__name__}.")
    if rngs is not None or example is not None:
        raise ValueError("bioflax.convert: rngs= and example= are for NNX models; a Linen "
                         "model draws and shapes its feedback weights at init.")
    return Converted(module=module, rule=rule, keep_backprop=keep_backprop,
                     conv_impl=_check_conv_impl(conv_impl), feedback_points=feedback_points)


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


def _why_bp(record: LayerRecord) -> str:
    if record.path == "(top)":
        return "bp (the model's own parameters)"
    if record.layer == "Embed":
        return "bp (embedding lookup: first layer of its path)"
    return "bp (not a converted layer class)"


def summary(converted, *args, **kwargs) -> str:
    """A table of every parametrised layer and the rule that trains it (as biotorch
    prints after converting), from tracing ``init`` on ``args``; a converted Conv layer's
    class names its convolution (``Conv (xla)``, ``Conv (banded)``, or ``Conv (custom)``
    for a layer given its own). For a converted NNX model (``args`` optional) see
    :func:`bioflax.nnx_converter.summary`."""
    from bioflax import nnx_converter  # it builds on this module
    if isinstance(converted, nnx_converter.Converted):
        return nnx_converter.summary(converted, *args, **kwargs)
    records = [r if r.path else dataclasses.replace(  # the top module's own parameters
        r, path="(top)", layer=type(converted.module).__name__)
        for r in layer_records(converted, *args, **kwargs)]
    return summary_table(
        [(r.path, r.layer if r.conv_impl is None else f"{r.layer} ({r.conv_impl})",
          r.rule if r.converted else _why_bp(r), r.rule == "bp" or not r.converted)
         for r in records], converted.rule.name)


def summary_table(rows: Sequence[tuple[str, str, str, bool]], rule_name: str) -> str:
    """The summary's table of ``(path, class, rule, trained by backprop)`` rows."""
    width = max([len(path) for path, *_ in rows] + [5])
    class_width = max([len(layer) for _, layer, *_ in rows] + [12])
    lines = [f"{'layer':<{width}}  {'class':<{class_width}}  rule",
             "-" * (width + class_width + 28)]
    lines += [f"{path:<{width}}  {layer:<{class_width}}  {rule}"
              for path, layer, rule, _ in rows]
    kept = sum(backprop for *_, backprop in rows)
    lines.append(f"{len(rows) - kept} layers trained by {rule_name!r}, {kept} by backprop.")
    return "\n".join(lines)
