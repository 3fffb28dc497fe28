"""The optimiser built from `Settings`: AdamW, parameter groups, schedule, warmup, gradient clipping.

Per-entry hyperparameters: AdamW's learning rate and weight decay live in the optimiser state
(`optax.inject_hyperparams`), so every vmapped entry (seed, sweep entry) carries its own and a learning-rate
sweep compiles once. `set_hyperparams` writes them into a fresh state.

Parameter groups (`Settings.groups`, see `localmoe.train.settings`): without groups the optimiser is one
`inject_hyperparams(adamw)`. With groups it is `optax.partition` of one such AdamW per group (plus "rest" for
the unmatched parameters; `optax.set_to_zero` for a frozen group), each group's rate the entry's rate times
its `lr_mult` and its weight decay its own or the entry's. Clipping (global norm over all parameters) comes
first and the schedule multiplier last, as without groups.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from localmoe import params as params_lib
from localmoe.train.settings import REST, GroupRule, Settings


def lr_multiplier(settings: Settings, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """The schedule of `settings` as a multiplier of each entry's learning rate, step -> [0, 1]."""
  decay_steps = max(1, total_steps - settings.warmup_steps)
  decay = {
    "constant": optax.constant_schedule(1.0),
    "cosine": optax.cosine_decay_schedule(1.0, decay_steps),
    "linear": optax.linear_schedule(1.0, 0.0, decay_steps),
  }[settings.schedule]
  if not settings.warmup_steps:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, 1.0, settings.warmup_steps), decay], [settings.warmup_steps])


def _adamw(b1: float, b2: float) -> optax.GradientTransformation:
  return optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.0, b1=b1, b2=b2)


def group_of(groups: tuple[GroupRule, ...], path: str) -> str:
  """The group name of a "/"-joined parameter path: the first matching rule's, else "rest"."""
  for rule in groups:
    if rule.matches(path):
      return rule.name
  return REST


def group_labels(groups: tuple[GroupRule, ...]) -> Callable[[Any], Any]:
  """params -> a tree of group names with the params' structure (optax.partition's param_labels)."""
  return lambda params: jax.tree_util.tree_map_with_path(
    lambda key_path, _: group_of(groups, params_lib.path_string(key_path)), params
  )


def make_optimizer(settings: Settings | None = None, total_steps: int = 1) -> optax.GradientTransformation:
  """AdamW (hyperparameters in the optimiser state, so they can differ per entry), built from `settings`.

  grad_clip > 0 clips the gradients' global norm first; a schedule other than "constant" (or a warmup)
  multiplies every update by lr_multiplier(step), i.e. each entry's learning rate follows the schedule;
  parameter groups partition AdamW by path (module docstring). Without any of these it is the bare
  `inject_hyperparams(adamw)`. Rates are set per entry by `set_hyperparams`.
  """
  b1, b2 = (0.9, 0.999) if settings is None else (settings.b1, settings.b2)
  groups = () if settings is None else settings.groups
  if groups:
    transforms = {rule.name: optax.set_to_zero() if rule.freeze else _adamw(b1, b2) for rule in groups}
    transforms[REST] = _adamw(b1, b2)
    core = optax.partition(transforms, group_labels(groups))
  else:
    core = _adamw(b1, b2)
  if settings is None or (not settings.grad_clip and settings.schedule == "constant" and not settings.warmup_steps):
    return core
  clip = optax.clip_by_global_norm(settings.grad_clip) if settings.grad_clip else optax.identity()
  return optax.chain(clip, core, optax.scale_by_schedule(lr_multiplier(settings, total_steps)))


def _core_state(opt_state):
  """The AdamW (or partition) state inside an optimiser state of `make_optimizer` (bare or chained)."""
  if hasattr(opt_state, "hyperparams") or hasattr(opt_state, "inner_states"):
    return opt_state
  return opt_state[1]


def hyperparams(opt_state) -> dict[str, dict]:
  """{group name: its `inject_hyperparams` dict} of an optimiser state of `make_optimizer` ("all" without
  groups; frozen groups have none)."""
  core = _core_state(opt_state)
  if hasattr(core, "hyperparams"):
    return {"all": core.hyperparams}
  return {
    name: masked.inner_state.hyperparams
    for name, masked in core.inner_states.items()
    if hasattr(masked.inner_state, "hyperparams")
  }


def set_hyperparams(opt_state, settings: Settings, learning_rate, weight_decay) -> None:
  """Writes one entry's learning rate and weight decay (scalars, traced or not) into its fresh optimiser
  state, in place: per group, rate x lr_mult and the group's weight decay where it sets one."""
  rules = {rule.name: rule for rule in settings.groups}
  for name, hp in hyperparams(opt_state).items():
    rule = rules.get(name)
    lr = learning_rate if rule is None else learning_rate * jnp.float32(rule.lr_mult)
    wd = weight_decay if rule is None or rule.weight_decay is None else jnp.float32(rule.weight_decay)
    hp.update(
      learning_rate=jnp.asarray(lr, jnp.float32),
      weight_decay=jnp.asarray(wd, jnp.float32),
      b1=jnp.asarray(settings.b1, jnp.float32),
      b2=jnp.asarray(settings.b2, jnp.float32),
    )


def _examples(paths: list[str], count: int = 5) -> str:
  """Up to `count` paths of different kinds (first or last part differs), quoted: what a pattern can match."""
  picked, kinds = [], set()
  for path in paths:
    parts = path.split("/")
    kind = (parts[0], parts[-1])
    if kind not in kinds:
      kinds.add(kind)
      picked.append(path)
    if len(picked) == count:
      break
  return ", ".join(repr(p) for p in picked)


def group_sizes(settings: Settings, params, where: str = "", added: Mapping[str, str] | None = None) -> dict[str, int]:
  """{group name: parameter count} of one entry's params, rules in order then "rest" (only if non-empty).

  Resolving the rules against `params` (arrays or shapes) refuses, with a ValueError naming the rule and the
  fix: a rule that matches no parameter (showing paths it could match), a rule whose every match an earlier
  rule already takes (first match wins; naming that rule), and groups that freeze every parameter (nothing
  would train). `where` names the method in the message, e.g. " (method lora)"; `added`: {rule name: where it
  comes from} for rules the experiment puts before the config's (named so in the message).
  """
  paths = [(path, leaf) for path, leaf in params_lib.leaf_paths(params)]
  sizes = {rule.name: 0 for rule in settings.groups}
  sizes[REST] = 0
  for path, leaf in paths:
    sizes[group_of(settings.groups, path)] += math.prod(leaf.shape)
  field = f"config.optim.groups{where}"
  for index, rule in enumerate(settings.groups):
    if sizes[rule.name]:
      continue
    matched = [path for path, _ in paths if rule.matches(path)]
    if matched:
      earlier = next(r for r in settings.groups[:index] if r.matches(matched[0]))
      if earlier.name in (added or {}):
        fix = f"narrow the pattern of {rule.name!r} or remove it"
        origin = f"{earlier.name!r} (pattern {earlier.pattern!r}, which {added[earlier.name]})"
      else:
        fix = f"put {rule.name!r} first, narrow the pattern of {earlier.name!r}, or remove one of them"
        origin = f"{earlier.name!r} (pattern {earlier.pattern!r})"
      raise ValueError(
        f"{field}: rule {rule.name!r} (pattern {rule.pattern!r}) matches only parameters that the "
        f"earlier rule {origin} already takes, e.g. {matched[0]!r}; the first matching rule wins: "
        f"{fix}."
      )
    raise ValueError(
      f"{field}: rule {rule.name!r} (pattern {rule.pattern!r}) matches no trainable parameter "
      f"(a full match of the '/'-joined path; the paths here are e.g. "
      f"{_examples([path for path, _ in paths])}): fix the pattern or remove the rule."
    )
  frozen = [rule.name for rule in settings.groups if rule.freeze and sizes[rule.name]]
  if frozen and not sizes[REST] and all(rule.freeze for rule in settings.groups if sizes[rule.name]):
    raise ValueError(
      f"{field}: every trainable parameter is in a frozen group ({', '.join(map(repr, frozen))}), "
      "so nothing would train: set freeze=False on one of them, or narrow its pattern."
    )
  if not sizes[REST]:
    sizes.pop(REST)
  return sizes


def check_groups(
  settings: Settings, init: Callable[[jax.Array, Any], Any], frozen: Any = None, where: str = ""
) -> dict[str, int]:
  """`group_sizes` of the params `init(key, frozen)` would make, from their shapes alone (`jax.eval_shape`:
  nothing is computed), so an experiment's `validate` can refuse bad rules for each of its methods before
  anything is written. `frozen` may hold arrays or `jax.ShapeDtypeStruct`s. {} without groups."""
  if not settings.groups:
    return {}
  shapes = jax.eval_shape(lambda key, frozen: init(key, frozen), jax.random.PRNGKey(0), frozen)
  return group_sizes(settings, shapes, where)


def describe_groups(settings: Settings, sizes: dict[str, int]) -> str:
  """One line: every group's parameter count and overrides."""
  rules = {rule.name: rule for rule in settings.groups}
  return "; ".join(
    f"{name} {count:,} ({rules[name].describe() if name in rules else 'base settings'})"
    for name, count in sizes.items()
  )
