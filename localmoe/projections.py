"""Projections of any class: the weight's own matmul, found and adapted where the model computes it.

Flax's built-in linear layers (`nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`, `nnx.Linear`, `nnx.LinearGeneral`,
`nnx.Einsum`) are adapted by their class (`localmoe.inject`, `localmoe.nnx_inject`). Models researchers use
often bring their own projection classes instead: tunix's `Einsum(nnx.Module)` (a param `w`,
`jnp.einsum(self.einsum_str, x, w)`), gemma's linen `Einsum` (called as `module(eqn, x)`, its weight named by
`weight_name` and kept in its parent's scope by `nn.share_scope`), MaxText's `DenseGeneral(nnx.Module)` on
`jax.lax.dot_general` after a dtype cast. For those, the hosts intercept the weight's contraction itself:

  * A *generic* module is one whose class is not a Flax built-in and that directly owns one or more params
    with ndim >= 2. While it is called, `jax.numpy.einsum`, `jax.numpy.dot`, `jax.numpy.matmul`,
    `jax.lax.dot_general` and the arrays' `@` are replaced (module and class attributes, restored on exit;
    `intercepting`), and the first
    contraction of each call one of whose operands is one of the module's weights (the same array object,
    else an array of exactly the weight's shape: a dtype cast) is that weight's projection. Its equation is
    normalised to "<x letters>,<kernel letters>-><out letters>" (dot, matmul and dot_general dimension
    numbers converted; operands swapped when the weight comes first) and read through
    `localmoe.einsum_layers` as one d_in -> d_out map (LayerInfo kind "Einsum").
  * At run time the same interception returns op(x, W) + Delta(x), Delta computed by the adapter with the
    interception switched off; a child module's ops are attributed to the child (a frame per module call),
    never to its parent (NNX, whose child calls have no frame: a child's param is never taken for the
    parent's weight, and a weight shaped like a child's param is recognised by identity only).
  * Layer key: the module path when the weight param is named "kernel" or "w", else module path + "/" +
    param name (gemma's shared-scope "mlp/gating_einsum", "mlp/linear"). `target_modules` matches the key.
  * Stacked projections (`STACKED`): a weight whose leading axis stacks projections (an axis of the kernel
    and of the output, not of x), named in `STACKED` by the module's or the param's name, is split into one
    adapter per slice with keys "<key>/<slice name>" ("attn/qkv_einsum/q", ".../k", ".../v"), so q, k and
    v are targeted apart; the delta is assembled along the output's stack axis. A pattern that matches the
    whole key adapts every slice. Edit `STACKED` (a module-level dict) to add names.
  * Refused by name, never adapted silently: stacked MoE experts (a weight whose leading expert axis is a
    batch axis of the op, or whose slices W[i] are used one by one), equations without a d_in -> d_out view,
    and matched weights whose contraction was not intercepted (`jax.lax.ragged_dot`, a Pallas kernel, a
    module that imported `dot_general` by name before the interception, a method other than `__call__`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import string
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp

from localmoe import adapt_core
from localmoe import einsum_layers

# A weight whose leading axis stacks projections, by module or param name: slice names, in axis order.
STACKED: dict[str, tuple[str, ...]] = {
  "qkv_einsum": ("q", "k", "v"),  # gemma / tunix: 'BTD,SNDH->SBTNH', w [3, N, D, H]
  "kv_einsum": ("k", "v"),  # gemma / tunix: 'BSD,CKDH->CBSKH', w [2, K, D, H]
  "gating_einsum": ("gate", "up"),  # gemma FeedForward: '...F,NHF->...NH', w [2, H, F]
}

_PLAIN_NAMES = ("kernel", "w")  # a weight of this name is keyed by its module's path alone


def is_builtin(module: Any) -> bool:
  """True for a Flax class (adapted by class, or never adapted: Embed, Conv, norms, ...) or a localmoe one."""
  return type(module).__module__.split(".")[0] in ("flax", "localmoe")


def layer_key(module_path: str, param: str) -> str:
  """The key `target_modules` matches for one weight of a generic module."""
  if param in _PLAIN_NAMES:
    return module_path
  return f"{module_path}/{param}" if module_path else param


def stack_names(module_path: str, param: str) -> tuple[str, ...]:
  """The STACKED slice names of a weight (by the param's name, else the module's), or ()."""
  if param in STACKED:
    return tuple(STACKED[param])
  return tuple(STACKED.get(module_path.rpartition("/")[2], ()))


@dataclasses.dataclass(frozen=True)
class Slot:
  """One adapted projection of a generic module: a weight, or one slice of a stacked weight."""

  key: str  # the layer key, e.g. "layers/0/attn/qkv_einsum/q"
  module_path: str  # "layers/0/attn/qkv_einsum"
  param: str  # "w"
  index: int = -1  # the slice along the leading axis; -1: the whole weight
  count: int = 0  # slices of the stacked weight; 0: not split
  shape: tuple[int, ...] = ()  # the weight's shape as its contraction saw it


def candidate_keys(module_path: str, param: str) -> list[str]:
  """Every key a weight may be adapted under: the weight's key and its STACKED slices' keys."""
  key = layer_key(module_path, param)
  return [key] + [f"{key}/{name}" for name in stack_names(module_path, param)]


def wanted(module_path: str, params: Mapping[str, Any], matches: Callable[[str], bool]) -> dict[str, Any]:
  """The weights (ndim >= 2) of a generic module that `matches` selects through any of their keys."""
  return {
    name: value
    for name, value in params.items()
    if getattr(value, "ndim", 0) >= 2 and any(matches(k) for k in candidate_keys(module_path, name))
  }


# ------------------------------------------------------------------------------------------- equations


class Refused(ValueError):
  """A contraction of the weight that has no d_in -> d_out view; experts=True for stacked MoE experts."""

  def __init__(self, message: str, experts: bool = False):
    super().__init__(message)
    self.experts = experts


def _compact(lhs: str, rhs: str, out: str) -> str:
  """ "<lhs>,<rhs>-><out>", x's leading kept axes written as "..." when they lead the output too."""
  rest = "".join(c for c in lhs if c in out and c not in rhs)
  if rest and lhs.startswith(rest) and out.startswith(rest):
    return f"...{lhs[len(rest) :]},{rhs}->...{out[len(rest) :]}"
  return f"{lhs},{rhs}->{out}"


def _from_dimension_numbers(x_ndim: int, w_ndim: int, w_first: bool, contracting, batch) -> str:
  """The einsum equation of a dot_general (output: batch, lhs free, rhs free axes), x's letters first."""
  (lc, rc), (lb, rb) = contracting, batch
  a_ndim, b_ndim = (w_ndim, x_ndim) if w_first else (x_ndim, w_ndim)
  w_batch = lb if w_first else rb
  if lb or rb:
    if 0 in tuple(w_batch):
      raise Refused(
        "the op batches over the weight's leading axis (stacked experts: a weight per expert)", experts=True
      )
    raise Refused(f"the op has batch dimensions {tuple(lb)}, {tuple(rb)} (a kernel per batch index)")
  letters = iter(string.ascii_letters)
  a = [next(letters) for _ in range(a_ndim)]
  b: list[str | None] = [None] * b_ndim
  for i, j in zip(lc, rc):
    b[j] = a[i]
  b = [c if c is not None else next(letters) for c in b]
  out = [a[i] for i in range(a_ndim) if i not in lc] + [b[j] for j in range(b_ndim) if j not in rc]
  x, w = ("".join(b), "".join(a)) if w_first else ("".join(a), "".join(b))
  return _compact(x, w, "".join(out))


def _dot_numbers(a_ndim: int, b_ndim: int):
  """jnp.dot as dot_general numbers: a's last axis with b's second-to-last (b's only axis when 1-D)."""
  return ((a_ndim - 1,), (max(b_ndim - 2, 0),)), ((), ())


def equation(op: str, args: Sequence[Any], w_first: bool) -> str:
  """The normalised equation "<x>,<kernel>-><out>" of one intercepted op (args: its positional operands)."""
  if op == "einsum":
    eq = args[0].replace(" ", "")
    if eq.count(",") != 1 or "->" not in eq:
      raise Refused(f"einsum {args[0]!r} needs two operands and an explicit '->'")
    operands, out = eq.split("->")
    a, b = operands.split(",")
    return f"{b},{a}->{out}" if w_first else f"{a},{b}->{out}"
  a, b = args[0], args[1]
  w, x = (a, b) if w_first else (b, a)
  if op == "dot_general":
    contracting, batch = args[2]
    return _from_dimension_numbers(x.ndim, w.ndim, w_first, contracting, batch)
  if op == "matmul":
    if w.ndim > 2:
      raise Refused(
        f"matmul broadcasts the weight's leading axes {tuple(w.shape[:-2])} (a kernel per batch index)", experts=True
      )
    if w_first and x.ndim > 2:  # W [m, k] @ x [..., k, n] -> [..., m, n]
      return "...kn,mk->...mn"
  contracting, batch = _dot_numbers(a.ndim, b.ndim)
  return _from_dimension_numbers(x.ndim, w.ndim, w_first, contracting, batch)


# ------------------------------------------------------------------------------------------- interception


@dataclasses.dataclass(frozen=True)
class Hit:
  """The first contraction of one weight in one call: its normalised equation and operands' shapes."""

  param: str
  equation: str
  x_shape: tuple[int, ...]
  w_shape: tuple[int, ...]


class Frame:
  """One call of one module: the weights whose contractions are attributed to it (none: an opaque frame).

  handler(hit, x, w, y) -> y with the adapters' delta (run mode); None records the hits only (discovery).
  """

  def __init__(
    self,
    module_path: str = "",
    weights: Mapping[str, Any] | None = None,
    handler: Callable | None = None,
    foreign: Sequence[Any] = (),
    owner: Any = None,
    on_hit: Callable | None = None,
  ):
    self.module_path = module_path
    self.owner = owner  # the module whose call this is
    self.on_hit = on_hit  # on_hit(frame, hit): discovery's record, in call order
    self.weights = dict(weights or {})  # param name -> the array the module holds
    self.handler = handler
    # Other modules' arrays (NNX: the submodules' params, whose calls have no frame of their own): never this
    # module's weight, and their shapes need the identity, since a cast copy of theirs could match by shape.
    self.foreign = frozenset(id(a) for a in foreign)
    self.foreign_shapes = frozenset(tuple(getattr(a, "shape", ())) for a in foreign)
    self.hits: dict[str, Hit] = {}  # param name -> its first contraction in this call
    self.problems: dict[str, Refused] = {}  # param name -> why its contraction cannot be adapted
    self.slices: dict[str, tuple[int, ...]] = {}  # param name -> shape of a slice W[i] used on its own

  def _which(self, a, b) -> tuple[str, bool] | None:
    """(param, weight is the first operand) of an op on a and b, or None."""
    for name, value in self.weights.items():
      for first, operand in ((False, b), (True, a)):
        if operand is value:
          return name, first
    for name, value in self.weights.items():
      if tuple(value.shape) in self.foreign_shapes:
        continue
      for first, operand in ((False, b), (True, a)):
        if id(operand) not in self.foreign and tuple(getattr(operand, "shape", ())) == tuple(value.shape):
          return name, first
    for name, value in self.weights.items():  # a slice of a stacked weight: evidence of experts
      for operand in (b, a):
        if value.ndim >= 3 and tuple(getattr(operand, "shape", ())) == tuple(value.shape[1:]):
          self.slices.setdefault(name, tuple(value.shape[1:]))
    return None

  def intercept(self, op: str, original: Callable, args: tuple, kwargs: dict):
    a, b = (args[1], args[2]) if op == "einsum" else (args[0], args[1])
    found = self._which(a, b)
    if found is None or found[0] in self.hits or found[0] in self.problems:
      return _quiet(original, args, kwargs)
    name, w_first = found
    x, w = (b, a) if w_first else (a, b)
    try:
      eq = equation(op, args, w_first)
      operands, out = eq.split("->")
      lhs, rhs = operands.split(",")
      if w.ndim >= 3 and rhs[:1].isalpha() and rhs[0] in lhs and rhs[0] in out:
        raise Refused(f"the op ({eq!r}) keeps the weight's leading axis as a batch axis of x", experts=True)
      einsum_layers.parse(eq, x.ndim, layer_key(self.module_path, name))
    except Refused as refused:
      self.problems[name] = refused
      return _quiet(original, args, kwargs)
    except ValueError as error:
      self.problems[name] = Refused(str(error))
      return _quiet(original, args, kwargs)
    hit = Hit(name, eq, tuple(x.shape), tuple(w.shape))
    self.hits[name] = hit
    if self.on_hit is not None:
      self.on_hit(self, hit)
    y = _quiet(original, args, kwargs)
    if self.handler is None:
      return y
    return _quiet(self.handler, (hit, x, w, y), {})


_TLS = threading.local()  # .frames: [Frame]; .off: nesting depth of suppressed code
_LOCK = threading.Lock()
_PATCHED = {"depth": 0, "saved": {}}
_TARGETS = (
  (jnp, "einsum", "einsum"),
  (jnp, "dot", "dot"),
  (jnp, "matmul", "matmul"),
  (jax.lax, "dot_general", "dot_general"),
)


def _frames() -> list:
  if not hasattr(_TLS, "frames"):
    _TLS.frames, _TLS.off = [], 0
  return _TLS.frames


def top() -> Frame | None:
  """The innermost frame (None outside any module call)."""
  frames = _frames()
  return frames[-1] if frames else None


def is_quiet() -> bool:
  """True inside `quiet` (the adapters' own math): module calls there are not attributed."""
  _frames()
  return bool(_TLS.off)


def _current() -> Frame | None:
  frames = _frames()
  if _TLS.off or not frames or not frames[-1].weights:
    return None
  return frames[-1]


def _quiet(fn, args, kwargs):
  """fn(*args, **kwargs) with the interception off (the original op, the adapter's own math)."""
  _frames()
  _TLS.off += 1
  try:
    return fn(*args, **kwargs)
  finally:
    _TLS.off -= 1


@contextlib.contextmanager
def quiet() -> Iterator[None]:
  """No op is attributed to any module inside the block (the adapters' own math)."""
  _frames()
  _TLS.off += 1
  try:
    yield
  finally:
    _TLS.off -= 1


def _wrap(op: str, original: Callable) -> Callable:
  def intercepted(*args, **kwargs):
    frame = _current()
    if (
      frame is None
      or len(args) < (3 if op == "einsum" else 2)
      or (op == "einsum" and (not isinstance(args[0], str) or len(args) != 3))
    ):
      return original(*args, **kwargs)
    return frame.intercept(op, original, args, kwargs)

  intercepted.__wrapped__ = original
  intercepted.__name__ = getattr(original, "__name__", op)
  intercepted.__doc__ = getattr(original, "__doc__", None)
  return intercepted


def _operator(original: Callable, reflected: bool) -> Callable:
  """The `@` operator of jax arrays and tracers (`x @ W`, `W @ x`), intercepted as jnp.matmul."""

  def method(self, other):
    frame = _current()
    if frame is None or not hasattr(other, "shape"):
      return original(self, other)
    a, b = (other, self) if reflected else (self, other)
    return frame.intercept("matmul", lambda *_: original(self, other), (a, b), {})

  method.__wrapped__ = original
  return method


def _operator_classes() -> list:
  """The classes whose `@` is replaced: jax's tracers and its concrete array class (public names only)."""
  return [jax.core.Tracer, type(jnp.zeros(()))]


@contextlib.contextmanager
def intercepting() -> Iterator[None]:
  """Replaces jnp.einsum / jnp.dot / jnp.matmul / jax.lax.dot_general and the arrays' `@` for the block
  (nested blocks share one replacement; the originals are restored when the outermost block exits). Outside
  any module frame the replacements call the originals unchanged."""
  with _LOCK:
    if _PATCHED["depth"] == 0:
      for module, attr, op in _TARGETS:
        original = getattr(module, attr)
        _PATCHED["saved"][op] = (module, attr, original)
        setattr(module, attr, _wrap(op, original))
      for cls in _operator_classes():
        for attr, reflected in (("__matmul__", False), ("__rmatmul__", True)):
          original = vars(cls).get(attr)
          if original is not None:
            _PATCHED["saved"][f"{cls.__name__}.{attr}"] = (cls, attr, original)
            setattr(cls, attr, _operator(original, reflected))
    _PATCHED["depth"] += 1
  try:
    yield
  finally:
    with _LOCK:
      _PATCHED["depth"] -= 1
      if _PATCHED["depth"] == 0:
        for module, attr, original in _PATCHED["saved"].values():
          setattr(module, attr, original)
        _PATCHED["saved"].clear()


@contextlib.contextmanager
def frame(new: Frame) -> Iterator[Frame]:
  """Attributes the ops of the block to `new` (no weights: an opaque frame, e.g. a built-in layer's call)."""
  frames = _frames()
  frames.append(new)
  try:
    yield new
  finally:
    frames.pop()


# ------------------------------------------------------------------------------------------- layers


def stacked_axis(m: einsum_layers.EinsumMap, count: int, w_shape) -> bool:
  """True when the kernel's leading axis stacks `count` projections (kernel and output, not x)."""
  return bool(count) and w_shape[0] == count and m.rhs[0] in m.out and m.rhs[0] not in m.lhs


def slice_equation(eq: str) -> str:
  """The equation of one slice W[i]: the kernel's leading letter dropped from the kernel and the output."""
  operands, out = eq.split("->")
  lhs, rhs = operands.split(",")
  return f"{lhs},{rhs[1:]}->{out.replace(rhs[0], '')}"


def layers_of(hit: Hit, module_path: str, matches: Callable[[str], bool]) -> list[tuple[Slot, adapt_core.LayerInfo]]:
  """The adapted projections of one weight's contraction: one, or one per STACKED slice."""
  key = layer_key(module_path, hit.param)
  names = stack_names(module_path, hit.param)
  x_ndim = len(hit.x_shape)
  m = einsum_layers.parse(hit.equation, x_ndim, key)
  split = stacked_axis(m, len(names), hit.w_shape)
  slice_wanted = [n for n in names if matches(f"{key}/{n}")]
  if slice_wanted and not split:
    raise ValueError(
      f"layer {key!r}: target_modules selects its slice(s) {slice_wanted} (localmoe.projections."
      f"STACKED) but the weight {hit.w_shape} with equation {hit.equation!r} has no leading "
      f"stack axis of {len(names)} (in the kernel and the output, not in x); target {key!r} "
      "as one layer."
    )
  out = []
  if split and (slice_wanted or matches(key)):
    eq = slice_equation(hit.equation)
    for i, name in enumerate(names):
      if matches(key) or matches(f"{key}/{name}"):
        out.append(
          (
            Slot(f"{key}/{name}", module_path, hit.param, i, len(names), hit.w_shape),
            info(f"{key}/{name}", eq, x_ndim, hit.w_shape[1:]),
          )
        )
  elif matches(key):
    out.append((Slot(key, module_path, hit.param, shape=hit.w_shape), info(key, hit.equation, x_ndim, hit.w_shape)))
  return out


def info(key: str, eq: str, x_ndim: int, w_shape) -> adapt_core.LayerInfo:
  in_shape, out_shape = einsum_layers.widths(einsum_layers.parse(eq, x_ndim, key), w_shape)
  size_in, size_out = 1, 1
  for s in in_shape:
    size_in *= s
  for s in out_shape:
    size_out *= s
  return adapt_core.LayerInfo(
    path=key, d_in=size_in, d_out=size_out, kind="Einsum", in_shape=in_shape, out_shape=out_shape, axis=(), equation=eq
  )


def problem(module_path: str, param: str, shape, refused: Refused | None, slices: bool) -> str:
  """The error text of a matched weight that cannot be adapted (an expert stack, or no intercepted op)."""
  key = layer_key(module_path, param)
  shape = tuple(int(s) for s in shape)
  if slices or (refused is not None and refused.experts):
    how = (
      "the model uses its slices W[i] one by one (a loop over experts)" if slices and refused is None else str(refused)
    )
    return (
      f"layer {key!r} holds stacked MoE experts: its weight {shape} has a leading expert axis of {shape[0]} "
      f"and {how}, so one adapter per projection cannot stand for it; leave the experts out of "
      "target_modules (adapt the attention projections, the dense MLPs or the router by its own path), "
      "or build the experts as one layer each."
    )
  if refused is not None and str(refused).startswith("layer "):  # einsum_layers' own refusal
    return str(refused)
  if refused is not None:
    return f"layer {key!r} (weight {shape}): {refused}; leave it out of target_modules."
  return (
    f"layer {key!r} (weight {shape}) matches target_modules but no contraction of its weight was "
    "intercepted while its module ran (only jnp.einsum / jnp.dot / jnp.matmul / jax.lax.dot_general / @ "
    "inside the module's __call__ are: not jax.lax.ragged_dot, a Pallas kernel, a dot_general imported "
    "by name, or another method), so its adapter would never run; leave it out of target_modules."
  )


def refusal(problems: Sequence[str]) -> ValueError:
  """One error for the matched weights that cannot be adapted: the first one's text, then every other's key."""
  others = [re.match(r"layer '([^']*)'", text) for text in problems[1:]]
  also = [m.group(1) for m in others if m]
  return ValueError(problems[0] + (f" Also refused: {also}." if also else ""))


def delta(
  slots: Sequence[Slot],
  layers: Sequence[adapt_core.LayerInfo],
  hit: Hit,
  x,
  w,
  y,
  session: Callable[[str, Any, Any], Any],
) -> Any:
  """y + Delta(x) for one intercepted contraction; session(key, x [..., d_in], kernel [d_in, d_out]) is the
  adapter's Delta [..., d_out]. Stacked slots' deltas are assembled along the output's stack axis."""
  if len(slots) == 1 and slots[0].index < 0:
    layer = layers[0]
    flat = adapt_core.flatten_input(x, layer)  # [..., d_in]
    out = session(layer.path, flat, adapt_core.kernel_2d(w, layer))  # [..., d_out]
    return y + adapt_core.output_delta(out, layer, x.ndim, y.shape).astype(y.dtype)
  m = einsum_layers.parse(hit.equation, x.ndim, slots[0].key)
  axis = m.out.index(m.rhs[0])  # stack axis of y
  parts = {}
  for slot, layer in zip(slots, layers):
    flat = adapt_core.flatten_input(x, layer)  # [..., d_in]
    out = session(layer.path, flat, adapt_core.kernel_2d(w[slot.index], layer))  # [..., d_out]
    parts[slot.index] = adapt_core.output_delta(out, layer, x.ndim, None)
  count = slots[0].count
  shape = y.shape[:axis] + y.shape[axis + 1 :]
  stacked = jnp.stack(
    [parts[i] if i in parts else jnp.zeros(shape, parts[next(iter(parts))].dtype) for i in range(count)], axis=axis
  )
  return y + stacked.astype(y.dtype)


def merged_weight(w, parts: Sequence[tuple[Slot, adapt_core.LayerInfo, Any, Any]], context=None, host: str = "linen"):
  """The weight + Delta W in its own layout and dtype; parts: (slot, layer, adapter module, adapter params).

  Layers of a stack (weight [*stack, ...], adapter params [*stack, ...]): each layer of the stack merges its own.
  """
  stack = parts[0][1].stack if parts else ()
  if stack:
    if any(tuple(layer.stack) != tuple(stack) for _, layer, _, _ in parts):
      raise ValueError(f"layer {parts[0][1].path!r}: the projections of one weight have different stacks.")

    def one(w, *params):
      return merged_weight(
        w, [(slot, layer.unstacked(), module, p) for (slot, layer, module, _), p in zip(parts, params)], context, host
      )

    return adapt_core.over_stack(one, stack, w, *[p for _, _, _, p in parts])
  for slot, layer, module, params in parts:
    if slot.index < 0:
      w = adapt_core.merged_kernel(module, params, layer, w, context, host)
    else:
      w = w.at[slot.index].set(adapt_core.merged_kernel(module, params, layer, w[slot.index], context, host))
  return w
