"""``convert(model, rule)`` for Flax NNX models: the NNX plumbing of the rules of
:mod:`bioflax.rules` (each written once, for both APIs) and of DFA as
:mod:`bioflax.converter` defines it for Linen.

``convert`` returns a :class:`Converted` NNX module holding a copy of the model
(``nnx.clone``: the original is left as it was) in which every ``nnx.Linear``,
``nnx.LinearGeneral`` (so the projections of ``nnx.MultiHeadAttention``), ``nnx.Conv``,
``nnx.Einsum`` and ``nnx.Embed.attend`` trains by the rule. Each such layer becomes an
instance of a subclass of its own class (``RuleLinear`` of ``nnx.Linear``; a user's
subclass keeps its methods) whose ``dot_general`` / ``conv_general_dilated`` /
``einsum_op`` is the rule's operation on the layer's current variables, so the forward
pass is the original's and ``nnx.split`` / ``nnx.merge`` / ``nnx.jit`` carry the
conversion (the model itself converts too, when it is such a layer). Every other module
keeps exact backprop; :func:`summary` lists which rule trains each layer.

State: fixed matrices (FA's and frSF's ``B``, DFA's ``B_l``) are :class:`Feedback`
variables beside the layer's kernel (``feedback_kernel``, ``feedback_magnitude``,
``output_feedback``), so ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` never updates them;
KP's ``B`` is the ``nnx.Param`` ``feedback_kernel``; brSF draws ``M`` at every call from
the ``'feedback'`` stream of the ``rngs`` given to ``convert`` (kept by each layer as
``feedback_rngs``), reproducibly. DFA's ``B_l`` are shaped by the model's output and each
layer's input, so ``convert(model, 'dfa', rngs=..., example=x)`` traces the model once
on ``x`` (abstractly: no statistics or RNG state of the model change).
"""

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from bioflax import conv as conv_lib
from bioflax import converter, rules

RULE = "bioflax_rule"  # the rule of a converted layer (a static attribute)
PATH = "bioflax_path"  # its path in the converted model, for errors and the summary
FEEDBACK_RNGS = "feedback_rngs"  # the nnx.Rngs a layer draws per-call feedback from


class Feedback(nnx.Variable):
    """A fixed feedback matrix: a Variable type of its own, so no optimizer built with
    ``wrt=nnx.Param`` (nor its weight decay) reaches it and ``nnx.state(model, Feedback)``
    reads every one."""


@dataclasses.dataclass(frozen=True)
class NnxStore:
    """A :class:`bioflax.rules.Store` on an NNX layer: its variables are attributes of the
    layer, created (drawn from ``rngs``) only while ``convert`` runs."""

    layer: nnx.Module
    rngs: Optional[nnx.Rngs] = None

    def fixed(self, name, init, shape, dtype):
        return self._variable(Feedback, name, init, shape, dtype)

    def param(self, name, init, shape, dtype):
        return self._variable(nnx.Param, name, init, shape, dtype)

    def _variable(self, kind, name, init, shape, dtype):
        if name not in vars(self.layer):
            setattr(self.layer, name, kind(init(self._rngs().feedback(), shape, dtype)))
        return getattr(self.layer, name)[...]

    def rng(self, stream):
        if FEEDBACK_RNGS not in vars(self.layer):
            setattr(self.layer, FEEDBACK_RNGS, self._rngs())
        return getattr(getattr(self.layer, FEEDBACK_RNGS), stream)()

    def _rngs(self) -> nnx.Rngs:
        if self.rngs is None or not _has_stream(self.rngs, rules.FEEDBACK_RNG):
            given = "" if self.rngs is None else ", with a 'feedback' or 'default' stream"
            raise ValueError(
                f"bioflax.convert: layer {vars(self.layer).get(PATH, '')!r} draws feedback "
                f"weights: pass rngs=nnx.Rngs(feedback=seed){given} to bioflax.convert.")
        return self.rngs


def _has_stream(rngs: nnx.Rngs, stream: str) -> bool:
    """Whether ``rngs`` draws ``stream`` (its own, or its ``'default'`` one)."""
    try:
        getattr(rngs, stream)
    except AttributeError:
        return False
    return True


# --- the converted layers ------------------------------------------------------------------


def _einsum_op(rule, store, primitive, param_dtype):
    def op(einsum_str, x, kernel, **kwargs):
        return rule.linear(store, lambda x, w: primitive(einsum_str, x, w, **kwargs), x,
                           kernel, param_dtype, converter.einsum_fan_in(einsum_str, x, kernel))
    return op


def _dot_general_op(rule, store, primitive, param_dtype):
    return converter.rule_op(rule, store, primitive, param_dtype,
                             converter.dot_general_fan_in)


def _conv_op(rule, store, primitive, param_dtype):
    return converter.rule_op(rule, store, primitive, param_dtype)


def _einsum_axes(layer, x, args, kwargs):
    einsum_str = args[0] if args else kwargs.get("einsum_str")
    return converter.einsum_axes(einsum_str or layer.einsum_str, x, layer.kernel_shape)


# Each convertible class: the field holding its primitive, the primitive its field holds
# by default, how the rule's operation is built around it, and the axes of its input it
# contracts, from ``(layer, x, the call's other arguments, its keyword arguments)``.
_LAYERS: dict[type, tuple[str, Callable, Callable, Callable]] = {
    nnx.Linear: ("dot_general", jax.lax.dot_general, _dot_general_op,
                 lambda layer, x, args, kwargs: converter.last_axis(x)),
    nnx.LinearGeneral: ("dot_general", jax.lax.dot_general, _dot_general_op,
                        lambda layer, x, args, kwargs: converter.general_axes(layer.axis, x)),
    nnx.Conv: ("conv_general_dilated", jax.lax.conv_general_dilated, _conv_op,
               lambda layer, x, args, kwargs: converter.last_axis(x)),
    nnx.Einsum: ("einsum_op", jnp.einsum, _einsum_op, _einsum_axes),
}
CONVERTIBLE = (*_LAYERS, nnx.Embed)


def _own_primitive(layer: nnx.Module, field: str, default: Callable) -> Callable:
    """The primitive the layer would call unconverted (its ``*_cls`` wins, as in flax)."""
    state = vars(layer)
    if state.get(f"{field}_cls") is not None:
        return state[f"{field}_cls"]()
    return state[field] or default


def _layer_input(layer: nnx.Module, x, features: tuple[int, ...]):
    calls = _CALLS.get()
    if calls is not None:
        calls.append(vars(layer)[PATH])
    session = _SESSION.get()
    return x if session is None else session.layer_input(layer, x, features)


# The paths of the converted layers a traced call runs, for the summary (None: not traced).
_CALLS: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar(
    "bioflax_nnx_calls", default=None)
_GENERATED = "_bioflax_generated"  # marks the classes made here: "rule" or "point"


@functools.cache
def _rule_class(cls: type) -> type:
    """The converted twin of the layer class ``cls``: its primitive field reads as the
    rule's operation, and its input passes through the DFA session."""
    if issubclass(cls, nnx.Embed):
        def attend(self, query, out_sharding=None):
            query, embedding = self.promote_dtype((query, self.embedding[...]),
                                                  dtype=self.dtype)
            return vars(self)[RULE].linear(
                NnxStore(self), lambda q, e: jnp.dot(q, e.T, out_sharding=out_sharding),
                _layer_input(self, query, converter.last_axis(query)), embedding,
                self.param_dtype, embedding.shape[-1])
        return type(f"Rule{cls.__name__}", (cls,), {"attend": attend, _GENERATED: "rule"})

    base = next(layer for layer in _LAYERS if issubclass(cls, layer))
    field, default, build, features = _LAYERS[base]

    def stored(name):
        return property(lambda self: vars(self).get(name),
                        lambda self, value: vars(self).__setitem__(name, value))

    def primitive(self):
        return build(vars(self)[RULE], NnxStore(self), _own_primitive(self, field, default),
                     self.param_dtype)

    def __call__(self, x, *args, **kwargs):
        x = _layer_input(self, x, features(self, x, args, kwargs))
        return cls.__call__(self, x, *args, **kwargs)

    namespace = {field: property(primitive, stored(field).fset), "__call__": __call__,
                 _GENERATED: "rule"}
    if base is nnx.LinearGeneral:  # its dot_general_cls would win over dot_general
        namespace["dot_general_cls"] = property(lambda self: None,
                                                stored("dot_general_cls").fset)
    return type(f"Rule{cls.__name__}", (cls,), namespace)


@functools.cache
def _point_class(cls: type) -> type:
    """A feedback point's twin of ``cls``: its output receives DFA's projected error."""

    def __call__(self, *args, **kwargs):
        session = _SESSION.get()
        if session is None or not session.dfa_active() or session.inside_point:
            return cls.__call__(self, *args, **kwargs)
        return session.feedback_point(self, lambda: cls.__call__(self, *args, **kwargs))

    return type(f"FeedbackPoint{cls.__name__}", (cls,),
                {"__call__": __call__, _GENERATED: "point"})


# --- one call of a converted model -----------------------------------------------------------


class _Session:
    """The layers one call runs and, for DFA, the tensors that receive the projected
    error (as :class:`bioflax.converter._Session` for Linen)."""

    def __init__(self, rule: rules.Rule, store: Callable[[nnx.Module], rules.Store]):
        self.rule = rule
        self.store = store
        self.calls = 0
        self.dfa_inputs: list[converter.DfaInput] = []
        self.inside_point: list[str] = []

    def dfa_active(self) -> bool:
        return (isinstance(self.rule, rules.DirectFeedbackAlignment)
                and not rules.backprop_is_forced())

    def layer_input(self, layer: nnx.Module, x, features: tuple[int, ...]):
        """``x``, or under DFA ``stop_gradient(x)`` recorded for the projection (but for
        the first converted layer and inside a feedback point); the layer contracts the
        axes ``features`` of ``x``."""
        self.calls += 1
        if (self.calls == 1 or self.inside_point or not self.dfa_active()
                or not isinstance(vars(layer)[RULE], rules.DirectFeedbackAlignment)):
            return x
        self.dfa_inputs.append(converter.DfaInput(
            vars(layer)[PATH], x, False, self.store(layer),
            converter.position_feedback(self.rule, features)))
        return jax.lax.stop_gradient(x)

    def feedback_point(self, module: nnx.Module, run: Callable):
        path = vars(module)[PATH]
        output = converter.run_feedback_point(self.inside_point, path, run)
        self.dfa_inputs.append(converter.DfaInput(
            path, output, True, self.store(module),
            converter.position_feedback(self.rule, converter.last_axis(output))))
        return jax.lax.stop_gradient(output)


_SESSION: contextvars.ContextVar[Optional[_Session]] = contextvars.ContextVar(
    "bioflax_nnx_session", default=None)


@contextlib.contextmanager
def _session(session: _Session):
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)


class Converted(nnx.Module):
    """An NNX model whose linear layers train by ``rule``; made by :func:`convert`. Its
    call is the model's (same arguments, same outputs); ``.module`` is the model."""

    def __init__(self, module: nnx.Module, rule: rules.Rule):
        self.module = module
        self.rule = rule

    def __call__(self, *args, **kwargs):
        return self.run(NnxStore, *args, **kwargs)

    def run(self, store: Callable[[nnx.Module], rules.Store], *args, **kwargs):
        with _session(_Session(self.rule, store)) as session:
            output = self.module(*args, **kwargs)
        if session.dfa_inputs:
            output = converter.project_output_error(output, session.dfa_inputs, self.rule)
        return output


def _paths(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every module of ``model`` by its first path (``'blocks/0/attention/query'``)."""
    modules: dict[str, nnx.Module] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            modules.setdefault("/".join(map(str, path)), node)
    return modules


def _kernel(layer: nnx.Module) -> jax.Array:
    return (layer.embedding if isinstance(layer, nnx.Embed) else layer.kernel)[...]


def convert(module: nnx.Module, rule: rules.Rule, *, rngs: Optional[nnx.Rngs] = None,
            example: Any = None, keep_backprop: converter.KeepBackprop = (),
            conv_impl: str = "xla", feedback_points: Sequence[str] = ()) -> Converted:
    """A :class:`Converted` copy of the NNX ``module`` trained by ``rule`` (see the module
    docstring; :func:`bioflax.convert` documents the arguments). ``rngs`` draws the
    feedback weights (and brSF's per-call ones); ``example`` (an input array or a tuple of
    the model's arguments) is needed by DFA only."""
    if isinstance(rule, rules.DirectFeedbackAlignment) and rule.conv_feedback != "dense":
        raise ValueError("bioflax.convert: NNX models take DFA with conv_feedback='dense' "
                         f"only, not {rule.conv_feedback!r}.")
    model = nnx.clone(module)
    modules = _paths(model)
    layers = {path: layer for path, layer in modules.items()
              if isinstance(layer, CONVERTIBLE)}
    if not layers:
        raise ValueError(
            f"bioflax.convert: {type(module).__name__} holds no nnx.Linear, "
            "nnx.LinearGeneral, nnx.Conv, nnx.Einsum or nnx.Embed, so there is nothing to "
            "train with a rule.")
    converter.check_patterns("feedback point", feedback_points, [p for p in modules if p])
    if not callable(keep_backprop):
        converter.check_patterns("keep_backprop pattern", keep_backprop, list(layers),
                                 "converted layer")
    for path, layer in layers.items():
        keep = converter.keeps_backprop(keep_backprop, path, layer)
        object.__setattr__(layer, "__class__", _rule_class(type(layer)))
        setattr(layer, RULE, rules.Backprop() if keep else rule)
        setattr(layer, PATH, path)
        if isinstance(layer, nnx.Conv) and vars(layer)["conv_general_dilated"] is \
                jax.lax.conv_general_dilated:
            layer.conv_general_dilated = converter.CONV_IMPLS[conv_impl]()[1]
        layer_rule = vars(layer)[RULE]
        if isinstance(layer_rule, rules.KernelReplacingRule):  # draw B now, not in a trace
            layer_rule.backward_kernel(NnxStore(layer, rngs), _kernel(layer),
                                       layer.param_dtype, 1)
    for path, point in modules.items():
        if path and converter.matches_any(path, feedback_points):
            object.__setattr__(point, "__class__", _point_class(type(point)))
            setattr(point, PATH, path)
    converted = Converted(model, rule)
    if isinstance(rule, rules.DirectFeedbackAlignment):
        _draw_dfa_feedback(converted, rngs, example)
    return converted


@dataclasses.dataclass
class _ShapeRecorder:
    """A store that records the feedback matrices a DFA call needs, returning zeros."""

    module: nnx.Module
    needed: list

    def fixed(self, name, init, shape, dtype):
        self.needed.append((vars(self.module)[PATH], name, shape, dtype))
        return jnp.zeros(shape, dtype)


def _draw_dfa_feedback(converted: Converted, rngs: Optional[nnx.Rngs], example: Any):
    """Draws every DFA ``B_l`` of ``converted``, shaped by an abstract call on ``example``."""
    if example is None:
        raise ValueError(
            "bioflax.convert: DFA's feedback matrices are shaped by the model's output and "
            "each layer's input: pass example=x (a batch of inputs, or a tuple of the "
            "model's arguments).")
    args = example if isinstance(example, tuple) else (example,)
    needed: list = []
    nnx.eval_shape(lambda model: model.run(
        lambda module: _ShapeRecorder(module, needed), *args), nnx.clone(converted))
    modules = _paths(converted.module)
    for path, name, shape, dtype in needed:
        NnxStore(modules[path], rngs).fixed(name, converted.rule.feedback_init, shape, dtype)


# --- the summary ---------------------------------------------------------------------------


def _original_class(module: nnx.Module) -> type:
    """The model's own class of ``module`` (the one its conversion subclassed)."""
    return next(c for c in type(module).__mro__ if _GENERATED not in vars(c))


def _conv_impl(layer: nnx.Conv) -> str:
    state = vars(layer)
    if state.get("conv_general_dilated_cls") is not None:
        return "custom"
    return {jax.lax.conv_general_dilated: "xla",
            conv_lib.conv_general_dilated: "banded"}.get(state["conv_general_dilated"],
                                                         "custom")


def summary(converted: Converted, *args, **kwargs) -> str:
    """The table of :func:`bioflax.converter.summary` for a converted NNX model: every
    module that owns ``nnx.Param`` variables, in NNX's graph order (parents first,
    attributes by name), its class (a Conv's with its convolution, a converted Embed's as
    ``Embed.attend``) and the rule that trains it: ``bp`` for a layer of
    ``keep_backprop``, ``dfa (backprop inside 'p')`` for one inside the DFA feedback point
    ``p``, ``bp (...)`` with the reason for the modules that keep backprop. Given the
    model's arguments, its call is traced abstractly (the model is left as it was) and an
    Embed whose ``attend`` the call does not run is listed as the lookup it is (backprop)."""
    modules: dict[tuple, nnx.Module] = {}
    for path, node in nnx.iter_graph(converted.module):
        if isinstance(node, nnx.Module):
            modules.setdefault(tuple(path), node)
    order = sorted(modules, key=lambda path: [(isinstance(k, str), k) for k in path])
    names = {path: "/".join(map(str, path)) for path in order}
    points = [names[path] for path in order  # outermost first
              if path and vars(type(modules[path])).get(_GENERATED) == "point"]
    called = None
    if args or kwargs:
        called = []
        token = _CALLS.set(called)
        try:
            nnx.eval_shape(lambda model: model(*args, **kwargs), nnx.clone(converted))
        finally:
            _CALLS.reset(token)
    rows = []
    for path in order:
        module, name = modules[path], names[path]
        if not any(isinstance(v, nnx.Param) for v in vars(module).values()):
            continue
        layer, rule = _original_class(module).__name__, vars(module).get(RULE)
        shown = name or "(top)"
        if rule is None:
            rows.append((shown, layer, "bp (the model's own parameters)" if not name
                         else "bp (not a converted layer class)", True))
            continue
        if isinstance(module, nnx.Embed):
            if called is not None and name not in called:
                rows.append((shown, layer, "bp (embedding lookup: first layer of its path)",
                             True))
                continue
            layer = f"{layer}.attend"
        if isinstance(module, nnx.Conv):
            layer = f"{layer} ({_conv_impl(module)})"
        point = next((p for p in points if name == p or name.startswith(p + "/")), None)
        if isinstance(rule, rules.Backprop):
            rows.append((shown, layer, "bp", True))
        elif point is not None:
            rows.append((shown, layer, f"{rule.name} (backprop inside {point!r})", False))
        else:
            rows.append((shown, layer, rule.name, False))
    return converter.summary_table(rows, converted.rule.name)


# Feedback variables form the 'feedback' collection, as a Linen model's fixed matrices do.
nnx.register_variable_name(rules.FEEDBACK_COLLECTION, Feedback)
