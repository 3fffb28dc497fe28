"""Optimisation settings: the `config.optim` block of an experiment, validated once (`Settings.from_config`).

Parameter groups (`config.optim.groups`) are data: an ordered list of rules, each a regular expression over
the "/"-joined path of a trainable parameter (e.g. "adapter/backbone/encoder/layer_0/attention/self/query/
router/kernel", `localmoe.params.leaf_paths`) and its overrides; the first rule whose pattern matches the
whole path wins, unmatched parameters keep the base settings. Written either as a list of dicts or as a dict
of named rules (matched in the order written, which a sweep can then address by name,
`"optim.groups.router.lr_mult": 100.0`):

  config.optim.groups = [dict(name="router", pattern=r".*/router/.*", lr_mult=100.0, weight_decay=0.0)]

On the command line (where ml_collections cannot override a list) the field is a string: preset names
joined by "+" (`--config.optim.groups=poly_router+heads_slow`) or a Python literal list of rules.

Rule fields: `pattern` (required), `name` (default "group<i>"), `lr_mult` (the group's learning rate is the
entry's rate times this; schedules, warmup and clipping apply as to every parameter), `weight_decay` (absolute,
replaces the entry's; None keeps it) and `freeze` (the group gets no update). `PRESETS` holds the settings
the field uses: Poly/MHR routers, task heads, LoRA+.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class GroupRule:
  """One parameter group of `config.optim.groups` (see the module docstring)."""

  name: str
  pattern: str  # regex, full match over the "/"-joined parameter path
  lr_mult: float = 1.0  # learning rate = entry learning rate x lr_mult
  weight_decay: float | None = None  # None: the entry's weight decay
  freeze: bool = False  # True: never updated (its parameters keep their initial values)

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.pattern, path) is not None

  def describe(self) -> str:
    if self.freeze:
      return "frozen"
    wd = "" if self.weight_decay is None else f", weight decay {self.weight_decay:g}"
    return f"lr x{self.lr_mult:g}{wd}"


_RULE_KEYS = tuple(f.name for f in dataclasses.fields(GroupRule))

# Parameter groups as the field writes them. They match both kinds of trainable tree: one adapter's own params
# (the single-layer experiments: "A", "B", "router/kernel") and `localmoe.inject`'s (adapter/<layer path>/<param>,
# extras/<module path>/<param>). Use one, or concatenate them.
PRESETS: dict[str, tuple[dict, ...]] = {
  # Polytropon / Multi-Head Routing (microsoft/mttl): routing logits at 100x the adapters' rate, no decay.
  # (Their U(-1e-3, 1e-3) router start is an adapter setting: router_init="uniform".)
  "poly_router": (dict(name="router", pattern=r"(?:.*/)?router/.*", lr_mult=100.0, weight_decay=0.0),),
  # Task heads of a multi-task model (`trainable_extras`) trained at the adapters' rate but without weight decay.
  "heads_no_decay": (dict(name="heads", pattern=r"extras/.*", weight_decay=0.0),),
  # LP-FT (Kumar et al. 2022): heads that start from a converged linear probe, fine-tuned at a tenth of the rate.
  "heads_slow": (dict(name="heads", pattern=r"extras/.*", lr_mult=0.1),),
  # LoRA+ (Hayou et al. 2024): B at 16x the rate of A (their recommended ratio for LoRA).
  "lora_plus": (dict(name="lora_b", pattern=r"(?:adapter/.*/)?B", lr_mult=16.0),),
}


def parse_groups(groups: Any) -> tuple[GroupRule, ...]:
  """`config.optim.groups` (a list of rule dicts, a dict of named rules, or a PRESETS name / '+'-joined
  names) -> GroupRules, in order. Any malformed rule is a ValueError naming it and the fix."""
  if groups is None or (isinstance(groups, (str, list, tuple)) and not groups):
    return ()
  if isinstance(groups, str) and groups.strip()[:1] in "[({":
    try:
      groups = ast.literal_eval(groups.strip())  # rules written on the command line
    except SyntaxError as error:
      raise ValueError(
        f"config.optim.groups={groups!r} is not a Python literal list of rule dicts (syntax error: "
        f"{error.msg}); e.g. \"[{{'pattern': '.*/router/.*', 'lr_mult': 100.0}}]\"."
      ) from None
    except ValueError:  # a call or a name, e.g. float('nan'): no value to print
      raise ValueError(
        f"config.optim.groups={groups!r} is not a Python literal list of rule dicts: only numbers, "
        "strings, True/False/None, lists and dicts may appear (no calls or names such as "
        "float('nan')); e.g. \"[{'pattern': '.*/router/.*', 'lr_mult': 100.0}]\"."
      ) from None
  if isinstance(groups, str):
    names = [n for n in groups.replace("+", ",").split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
      raise ValueError(
        f"config.optim.groups={groups!r}: unknown preset(s) {unknown}; valid: {sorted(PRESETS)}, "
        "or a list of rule dicts."
      )
    groups = [rule for n in names for rule in PRESETS[n]]
  if hasattr(groups, "to_dict") and hasattr(groups, "_fields"):  # a ConfigDict: keep its written order
    groups = {name: groups[name] for name in groups._fields}
  if isinstance(groups, Mapping):
    items = [(f"config.optim.groups.{name}", {"name": name, **_as_dict(rule)}) for name, rule in groups.items()]
  elif isinstance(groups, Sequence):
    items = [(f"config.optim.groups[{i}]", {"name": f"group{i}", **_as_dict(rule)}) for i, rule in enumerate(groups)]
  else:
    raise ValueError(
      f"config.optim.groups={groups!r} must be a list of rule dicts, e.g. "
      "[dict(pattern=r'.*/router/.*', lr_mult=100.0)]."
    )
  rules, seen = [], set()
  for where, rule in items:
    unknown = sorted(set(rule) - set(_RULE_KEYS))
    if unknown:
      raise ValueError(f"{where} has unknown key(s) {unknown}; valid: {sorted(_RULE_KEYS)}.")
    if not isinstance(rule.get("pattern"), str) or not rule["pattern"]:
      raise ValueError(f"{where} needs a 'pattern': a regex over the '/'-joined parameter path, e.g. r'.*/router/.*'.")
    try:
      re.compile(rule["pattern"])
    except re.error as error:
      raise ValueError(f"{where}.pattern={rule['pattern']!r} is not a valid regex ({error}).") from None
    lr_mult = rule.get("lr_mult", 1.0)
    if (
      isinstance(lr_mult, bool) or not isinstance(lr_mult, (int, float)) or not (lr_mult > 0 and math.isfinite(lr_mult))
    ):
      raise ValueError(f"{where}.lr_mult={lr_mult!r} must be a finite number > 0 (use freeze=True for no update).")
    wd = rule.get("weight_decay")
    if wd is not None and (
      isinstance(wd, bool) or not isinstance(wd, (int, float)) or not (wd >= 0 and math.isfinite(wd))
    ):
      raise ValueError(f"{where}.weight_decay={wd!r} must be a finite number >= 0, or None for the entry's.")
    if not isinstance(rule.get("freeze", False), bool):
      raise ValueError(f"{where}.freeze={rule['freeze']!r} must be True or False.")
    if rule["name"] in seen or rule["name"] == REST:
      raise ValueError(
        f"{where}: the group name {rule['name']!r} is used twice (or is reserved): name each rule differently."
      )
    seen.add(rule["name"])
    rules.append(
      GroupRule(
        name=str(rule["name"]),
        pattern=rule["pattern"],
        lr_mult=float(lr_mult),
        weight_decay=None if wd is None else float(wd),
        freeze=rule.get("freeze", False),
      )
    )
  return tuple(rules)


REST = "rest"  # the label of parameters no rule matches


def check_group_overrides(groups: Any, overrides: Mapping[str, Any], where: str = "sweep entry") -> None:
  """A sweep's overrides of one rule (`"optim.groups.<name>.<field>"`) need rules written out, as a dict of
  named rules or a list of rule dicts: over a preset string or a literal list written as a string they are a
  ValueError saying so (instead of a failed lookup inside a string)."""
  if not isinstance(groups, str):
    return
  for dotted in overrides:
    if isinstance(dotted, str) and dotted.startswith("optim.groups."):
      raise ValueError(
        f"{where}: override {dotted!r} addresses one rule, but config.optim.groups={groups!r} is a "
        "string (preset names or a literal list), whose rules cannot be addressed: write the rules "
        "out in the config as a dict of named rules, e.g. config.optim.groups = {'router': "
        "dict(pattern=r'(?:.*/)?router/.*', lr_mult=100.0)}, or override the whole field "
        "('optim.groups': 'poly_router')."
      )


def _as_dict(rule: Any) -> dict:
  if hasattr(rule, "to_dict"):
    return rule.to_dict()
  if isinstance(rule, Mapping):
    return dict(rule)
  raise ValueError(f"config.optim.groups: rule {rule!r} must be a dict (pattern, lr_mult, weight_decay, freeze).")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Optimisation settings (the `config.optim` block of an experiment; `from_config` reads it)."""

  epochs: int
  batch_size: int
  learning_rate: float
  weight_decay: float = 0.01  # PyTorch's AdamW default
  b1: float = 0.9
  b2: float = 0.999
  eval_batch_size: int = 8192  # evaluation is chunked to bound memory
  log_every: int = 0  # print progress every n epochs (0: about 5 lines per run)
  steps_per_epoch: int = 0  # 0: an epoch is one pass over the training set; n: an "epoch" is n
  # steps of an endless stream of passes (evaluate every n steps)
  eval_every: int = 1  # epochs per compiled call; evaluate (log, checkpoint, stop) after each
  schedule: str = "constant"  # learning-rate multiplier over training: constant, cosine or linear
  # (to 0 at the last step), after `warmup_steps` of linear warmup
  warmup_steps: int = 0
  grad_clip: float = 0.0  # clip gradients to this global norm (0: no clipping)
  eval_train_rows: int = 0  # evaluate the training split on its first n rows only (0: all rows);
  # for long streams, where a full pass per evaluation costs more than
  # training (put a fixed, representative subset first)
  test_at_end: bool = False  # evaluate the test split at the last evaluation only (NaN before; curves
  # from the train / val splits), where a test pass costs more than training
  groups: tuple[GroupRule, ...] = ()  # parameter groups, first match wins (config.optim.groups; see above)

  def check_batch(self, num_train: int) -> None:
    if self.batch_size > num_train:
      raise ValueError(
        f"config.optim.batch_size={self.batch_size} is larger than the training set "
        f"({num_train} samples): use batch_size <= {num_train}."
      )
    if self.eval_train_rows > num_train:
      raise ValueError(
        f"config.optim.eval_train_rows={self.eval_train_rows} is more than the training set "
        f"({num_train} rows): use eval_train_rows <= {num_train}, or 0 for all of them."
      )
    if self.steps_per_epoch > self.steps_per_pass(num_train):
      raise ValueError(
        f"config.optim.steps_per_epoch={self.steps_per_epoch} is more than one pass over the "
        f"training set ({self.steps_per_pass(num_train)} steps of {self.batch_size}): use "
        f"steps_per_epoch <= {self.steps_per_pass(num_train)}, or 0 for whole passes."
      )

  def __post_init__(self):
    for field in ("epochs", "batch_size", "eval_batch_size", "eval_every"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.optim.{_CONFIG_NAMES.get(field, field)}={value!r} must be a positive integer.")
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      raise ValueError(f"config.optim.lr={self.learning_rate!r} must be > 0 and finite (e.g. 1e-3).")
    if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
      raise ValueError(f"config.optim.weight_decay={self.weight_decay!r} must be >= 0 and finite.")
    for field in ("b1", "b2"):
      if not 0 <= getattr(self, field) < 1:
        raise ValueError(f"config.optim.{field}={getattr(self, field)!r} must lie in [0, 1).")
    if self.log_every < 0:
      raise ValueError(f"config.optim.log_every={self.log_every!r} must be >= 0.")
    if not isinstance(self.steps_per_epoch, int) or self.steps_per_epoch < 0:
      raise ValueError(
        f"config.optim.steps_per_epoch={self.steps_per_epoch!r} must be an integer >= 0 "
        "(0: one pass over the training set per epoch)."
      )
    if self.epochs % self.eval_every:
      raise ValueError(
        f"config.optim.epochs={self.epochs} is not a multiple of config.optim.eval_every="
        f"{self.eval_every}: make it one (the last epoch must be evaluated)."
      )
    if self.schedule not in SCHEDULES:
      raise ValueError(f"config.optim.schedule={self.schedule!r} is not known; valid: {list(SCHEDULES)}.")
    if not isinstance(self.eval_train_rows, int) or isinstance(self.eval_train_rows, bool) or self.eval_train_rows < 0:
      raise ValueError(
        f"config.optim.eval_train_rows={self.eval_train_rows!r} must be an integer >= 0 "
        "(0: evaluate every training row)."
      )
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ValueError(f"config.optim.warmup_steps={self.warmup_steps!r} must be an integer >= 0.")
    if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
      raise ValueError(f"config.optim.grad_clip={self.grad_clip!r} must be >= 0 (0: no clipping).")
    if not isinstance(self.test_at_end, bool):
      raise ValueError(f"config.optim.test_at_end={self.test_at_end!r} must be True or False.")
    if not all(isinstance(rule, GroupRule) for rule in self.groups):
      object.__setattr__(self, "groups", parse_groups(self.groups))

  def steps_per_pass(self, num_train: int) -> int:
    """Steps of one pass over the training set (the last batch is padded and masked)."""
    return math.ceil(num_train / self.batch_size)

  def steps(self, num_train: int) -> int:
    """Training steps between two evaluations."""
    return self.steps_per_epoch or self.steps_per_pass(num_train)

  @classmethod
  def from_config(cls, optim) -> "Settings":
    """From a `config.optim` block; its `lr` key is the learning rate. An unknown key is an error."""
    values = dict(optim.to_dict() if hasattr(optim, "to_dict") else optim)
    fields = {f.name for f in dataclasses.fields(cls)}
    if "groups" in values:
      values["groups"] = parse_groups(optim["groups"] if hasattr(optim, "to_dict") else values["groups"])
    renamed = {_SETTINGS_NAMES.get(k, k): v for k, v in values.items()}
    unknown = sorted(k for k, v in values.items() if _SETTINGS_NAMES.get(k, k) not in fields)
    if unknown:
      valid = sorted(_CONFIG_NAMES.get(f, f) for f in fields)
      raise ValueError(f"config.optim has unknown key(s) {unknown} that the trainer would ignore; valid: {valid}.")
    return cls(**renamed)


_CONFIG_NAMES = {"learning_rate": "lr"}  # Settings field -> config.optim key
_SETTINGS_NAMES = {v: k for k, v in _CONFIG_NAMES.items()}
