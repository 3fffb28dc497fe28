"""Helpers for config files: the typed variant string of `get_config(arg)` (big_vision style)."""

from __future__ import annotations

from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'quick,seeds=3,methods=lora+cellwise_moe' against typed defaults.

  A bare word sets a boolean default to True ('quick'); 'key=value' is cast to the default's type;
  '+' separates list items in strings. Unknown keys are an error that lists the valid ones.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for token in arg.split(","):
    token = token.strip()
    if not token:
      continue
    key, _, raw = token.partition("=")
    if key not in defaults:
      raise ValueError(f"config arg {key!r} is not known; valid: {sorted(defaults)}.")
    default = defaults[key]
    if not _:
      if not isinstance(default, bool):
        raise ValueError(f"config arg {key!r} needs a value ({key}=...).")
      result[key] = True
    elif isinstance(default, bool):
      result[key] = raw.lower() in ("1", "true", "yes")
    elif isinstance(default, int):
      result[key] = int(raw)
    elif isinstance(default, float):
      result[key] = float(raw)
    else:
      result[key] = raw.replace("+", ",")
  return result


def split_names(names: str) -> list[str]:
  """'lora, melora' -> ['lora', 'melora']."""
  return [n.strip() for n in names.split(",") if n.strip()]
