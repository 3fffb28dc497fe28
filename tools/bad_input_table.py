"""Prints the markdown tables of bad input: each case and what it gives now (the first line of the error, or
the chosen behaviour), observed by running it.

  python tools/bad_input_table.py > docs/bad_input_real_model.md            # the real-model path
  python tools/bad_input_table.py config > docs/bad_inputs.md               # the trainer and the experiments

The real-model cases are asserted by tests/test_inject_models.py (section "bad input"), tests/test_adapter_io.py
and tests/test_minilm.py; the config cases are the table `BAD_GROUPS` of tests/test_groups_everywhere.py (which
asserts them) and the cases of tests/test_multitask_report.py. This script only observes them. Each page is
printed on CPU in well under a minute, without a download.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from localmoe import adapter_io, adapters, inject
from localmoe.models import minilm

B, T, D, TASKS = 6, 5, 16, 3
CTX = {
  "method": "cellwise_moe",
  "k_y": 2,
  "k_x": 2,
  "rank": 2,
  "num_experts": 3,
  "router_input": "context",
  "context_dim": TASKS,
}


class Attn(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=D, name="attn")(x, x)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="head")(nn.relu(nn.Dense(8, name="hidden")(x)))


def outcome(fn) -> str:
  """The first line of the error `fn` raises, with its type; or what it returned."""
  try:
    result = fn()
  except Exception as error:  # pylint: disable=broad-except
    return f"`{type(error).__name__}: {str(error).splitlines()[0]}`"
  return result


def cases(tmp: str) -> list[tuple[str, str]]:
  model = Attn()
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  adapted, trainable = inject.inject(model, params, CTX, x[:1], target_modules=r"attn/.*", key=jax.random.PRNGKey(2))
  labels = jnp.arange(B) % TASKS
  bad_labels = labels.at[1].set(7)
  _, traces = adapted.apply(params, trainable, x, context=labels, capture_routing=True)

  def traced_ids():
    out = jax.jit(adapted.apply)(params, trainable, x, context=bad_labels)
    rows = [i for i in range(B) if bool(jnp.isnan(out[i]).all())]
    return f"outputs of example(s) {rows} are NaN (the others unchanged): a value check cannot raise under jit"

  def zero_mask():
    losses = inject.router_losses(traces, load_balance=1.0, z_loss=1.0, mask=jnp.zeros((B, T)))
    return "zero losses (and zero gradients): " + ", ".join(f"{k}={float(v):g}" for k, v in losses.items())

  def traced_groups():
    usage = jax.jit(lambda g: inject.routing_diagnostics(traces, groups=g, num_groups=2))(labels)["usage"]
    return f"usage and entropy are NaN (all NaN: {bool(jnp.isnan(usage).all())}): traced ids cannot raise"

  def list_extras():
    net = Net()
    xs = jnp.ones((2, 6))
    frozen = net.init(jax.random.PRNGKey(0), xs)["params"]
    a, _ = inject.inject(
      net,
      frozen,
      {"method": "lora", "rank": 2},
      xs,
      target_modules=["hidden"],
      key=jax.random.PRNGKey(1),
      trainable_extras=["head"],
    )
    return f"accepted, as target_modules: extra_paths={a.extra_paths}"

  rows = [
    (
      "`apply(..., context=labels)` with a task id 7 (`context_dim=3`), eager",
      outcome(lambda: adapted.apply(params, trainable, x, context=bad_labels)),
    ),
    (
      "the same with id -1 (or any id >= `context_dim`, e.g. `context_dim` set below the number of tasks)",
      outcome(lambda: adapted.apply(params, trainable, x, context=labels.at[1].set(-1))),
    ),
    (
      "the same under `jax.jit`, the context a constant closed over",
      outcome(lambda: jax.jit(lambda t: adapted.apply(params, t, x, context=bad_labels))(trainable)),
    ),
    ("the same under `jax.jit`, the context a traced argument", outcome(traced_ids)),
    ("`merge(..., context=7)`", outcome(lambda: adapted.merge(params, trainable, context=7))),
    (
      "`per_task_lora` (or a bare adapter) with a task id 7",
      outcome(
        lambda: adapters.make({"method": "per_task_lora", "rank": 2, "context_dim": TASKS}, d_in=D, d_out=D).init(
          jax.random.PRNGKey(0), x[:, 0], bad_labels
        )
      ),
    ),
    (
      "float labels `context=jnp.array([0., 1., 2.])` for 3 examples, `context_dim=3`",
      outcome(lambda: adapted.apply(params, trainable, x[:TASKS], context=jnp.arange(3.0))),
    ),
    ("`router_losses(..., mask=all zeros)`", outcome(zero_mask)),
    (
      "`router_losses(..., mask=[batch, tokens, 2])` (an extra axis)",
      outcome(lambda: inject.router_losses(traces, mask=jnp.ones((B, T, 2)))),
    ),
    (
      "`router_losses(..., mask=[4, tokens])` for a batch of 6 (context-routed layers)",
      outcome(lambda: inject.router_losses(traces, mask=jnp.ones((4, T)))),
    ),
    (
      "`routing_diagnostics(groups=ids 0..2, num_groups=2)`",
      outcome(lambda: inject.routing_diagnostics(traces, groups=labels, num_groups=2)),
    ),
    ("the same under `jax.jit`, the ids traced", outcome(traced_groups)),
    (
      "`adapters.make(dict(method='lora', rank=2, alpha=-1), ...)`",
      outcome(lambda: adapters.make({"method": "lora", "rank": 2, "alpha": -1}, d_in=D, d_out=D)),
    ),
    ("`inject(..., trainable_extras=['head'])`", outcome(list_extras)),
    (
      "`inject(..., trainable_extras=[])`",
      outcome(
        lambda: inject.inject(
          model, params, CTX, x[:1], target_modules=r"attn/.*", key=jax.random.PRNGKey(2), trainable_extras=[]
        )
      ),
    ),
  ]

  # Adapter files, on a small MLP with a trainable head.
  net = Net()
  xs = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
  frozen = net.init(jax.random.PRNGKey(1), xs)["params"]
  a, tr = inject.inject(
    net,
    frozen,
    {"method": "lora", "rank": 2},
    xs[:1],
    target_modules=["hidden"],
    key=jax.random.PRNGKey(2),
    trainable_extras="head",
  )
  saved = os.path.join(tmp, "adapter")
  adapter_io.save_adapter(saved, a, tr)
  weights, config = os.path.join(saved, adapter_io.WEIGHTS_FILE), os.path.join(saved, adapter_io.CONFIG_FILE)
  pristine = {name: open(os.path.join(saved, name), "rb").read() for name in os.listdir(saved)}

  def restore():
    for name, data in pristine.items():
      open(os.path.join(saved, name), "wb").write(data)

  def load(edit):
    restore()
    edit()
    try:
      return outcome(lambda: adapter_io.load_adapter(saved, net, frozen, xs[:1]))
    finally:
      restore()

  def truncate():
    open(weights, "wb").write(pristine[adapter_io.WEIGHTS_FILE][:200])

  def retype(dtype):
    arrays = load_file(weights)
    arrays["adapter/hidden/A"] = arrays["adapter/hidden/A"].astype(dtype)
    save_file(arrays, weights, metadata={"format": adapter_io.FORMAT})

  def unknown():
    arrays = load_file(weights)
    arrays["extras/other/kernel"] = np.zeros((2, 2), np.float32)
    save_file(arrays, weights, metadata={"format": adapter_io.FORMAT})

  def without_layers():
    cfg = json.loads(pristine[adapter_io.CONFIG_FILE])
    del cfg["layers"]
    open(config, "w").write(json.dumps(cfg))

  def head_round_trip():
    trained = jax.tree_util.tree_map(lambda v: v + 1.0, tr)
    adapter_io.save_adapter(os.path.join(tmp, "trained"), a, trained)
    _, loaded = adapter_io.load_adapter(os.path.join(tmp, "trained"), net, frozen, xs[:1])
    same = all(
      bool(jnp.array_equal(p, q))
      for p, q in zip(jax.tree_util.tree_leaves(loaded["extras"]), jax.tree_util.tree_leaves(trained["extras"]))
    )
    return f"loaded with the adapter, as saved (equal to the trained head: {same})"

  file = os.path.join(tmp, "notes.txt")
  open(file, "w").write("x")
  crowded = os.path.join(tmp, "run")
  os.makedirs(crowded)
  open(os.path.join(crowded, "results.json"), "w").write("{}")
  bad_extras = {
    "adapter": tr["adapter"],
    "extras": {"head": {"bias": jnp.zeros(4), "kernel": tr["extras"]["head"]["kernel"]}},
  }
  rows += [
    (
      "`save_adapter(dir, adapted, trainable)` with `trainable` lacking the extras",
      outcome(lambda: adapter_io.save_adapter(os.path.join(tmp, "x"), a, {"adapter": tr["adapter"]})),
    ),
    (
      "`save_adapter` with extras of the wrong shape",
      outcome(lambda: adapter_io.save_adapter(os.path.join(tmp, "x"), a, bad_extras)),
    ),
    (
      "a crash while saving",
      "both files are written to a temporary directory beside `dir`, then renamed into "
      "place (an old pair is swapped out, and put back if the rename fails): the old pair or the new pair, "
      "never one file of each",
    ),
    ("`save_adapter` onto an existing file", outcome(lambda: adapter_io.save_adapter(file, a, tr))),
    ("`save_adapter` under a file", outcome(lambda: adapter_io.save_adapter(os.path.join(file, "a"), a, tr))),
    ("`save_adapter` into a directory holding other files", outcome(lambda: adapter_io.save_adapter(crowded, a, tr))),
    ("`load_adapter` with a truncated `adapter.safetensors`", load(truncate).replace(tmp, "<tmp>")),
    (
      "`load_adapter` with a config that is a JSON list",
      load(lambda: open(config, "w").write("[1, 2]")).replace(tmp, "<tmp>"),
    ),
    ("`load_adapter` with a config lacking `layers`", load(without_layers).replace(tmp, "<tmp>")),
    ("`load_adapter` with a float16 tensor", load(lambda: retype(np.float16)).replace(tmp, "<tmp>")),
    ("`load_adapter` with an int32 tensor", load(lambda: retype(np.int32)).replace(tmp, "<tmp>")),
    ("`load_adapter` with an unknown tensor", load(unknown).replace(tmp, "<tmp>")),
    ("`load_adapter` of an adapter saved with `trainable_extras='head'`, none given on load", head_round_trip()),
  ]
  untouched = (None, None, None)
  rows += [
    ("`minilm.embed(texts, max_length=0)`", outcome(lambda: minilm.embed(["a"], max_length=0, backbone=untouched))),
    ("`minilm.embed(texts, max_length=1)`", outcome(lambda: minilm.embed(["a"], max_length=1, backbone=untouched))),
    ("`minilm.embed(texts, batch_size=2.5)`", outcome(lambda: minilm.embed(["a"], batch_size=2.5, backbone=untouched))),
  ]
  return [(case, result.replace(tmp, "<tmp>")) for case, result in rows]


def config_cases() -> list[tuple[str, str]]:
  """Bad `config.optim.groups` in each experiment (tests/test_groups_everywhere.py BAD_GROUPS), then the
  behaviours chosen on purpose."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, configs/
  from tests import test_groups_everywhere as groups_tests  # pylint: disable=import-outside-toplevel
  from localmoe.train import settings  # pylint: disable=import-outside-toplevel

  rows = []
  for case, experiment, methods, groups, _ in groups_tests.BAD_GROUPS:
    message = groups_tests.bad_groups_message(experiment, methods, groups)
    rows.append(
      (
        f"{case}: `{experiment}`, methods `{methods}`, `config.optim.groups={groups!r}`",
        f"`ValueError: {message}`" if message else "accepted",
      )
    )
  rows.append(
    (
      "a sweep entry `{'optim.groups.router.lr_mult': 10.0}` while `config.optim.groups='poly_router'`",
      outcome(
        lambda: settings.check_group_overrides("poly_router", {"optim.groups.router.lr_mult": 10.0}, "sweep entry 0")
      ),
    )
  )
  rows.append(
    (
      "`--config.optim.groups=...` on any config that trains (`svd_simulation`, `california_housing`, "
      "`mnist_degradation`, `mnist_adaptation`, `nonconvex_regression`, `multitask_text`)",
      "accepted: a preset string or a literal list on the command line, a list or a dict of named rules in "
      "a config file or a sweep; every method's rules are resolved against its own parameters before "
      "anything is read, written or computed (`launch.py`: exit 2)",
    )
  )
  rows.append(
    (
      "a routed method every seed of which diverges in the multi-task run (e.g. "
      "`configs/multitask_text.py:quick,methods=cellwise_moe_anchor,seeds=1 --config.optim.lr=1e6`)",
      "exit 0; results.md marks the method with † and prints n/a where no seed has a value (accuracy, "
      "router diagnostics at the end), results.json holds null there (no NaN); TensorBoard and the "
      "progress line skip values no seed has (no numpy or tensorboardX warnings); the figures stop at "
      "the last evaluation any seed reached; a re-run resumes from the final checkpoints "
      "(tests/test_multitask_report.py)",
    )
  )
  return rows


CONFIG_INTRO = (
  "# Bad input to the trainer and the experiments\n\n"
  "What each bad `config.optim.groups` (and the chosen behaviour of a diverged multi-task run) gives "
  "now, observed by `python tools/bad_input_table.py config` (which prints this file). The rows of "
  "errors are the table `BAD_GROUPS` of `tests/test_groups_everywhere.py`, which asserts them; the "
  "multi-task report is asserted by `tests/test_multitask_report.py`. Each error is one line naming "
  "the field, the method and the fix, raised by the experiment's `validate` before anything is read, "
  "written or computed (`launch.py` prints it and exits 2).\n"
)


def main():
  if sys.argv[1:] == ["config"]:
    print(CONFIG_INTRO)
    print("| case | what you get now |")
    print("|---|---|")
    for case, result in config_cases():
      print(f"| {case.replace('|', chr(92) + '|')} | {result.replace('|', chr(92) + '|')} |")
    return
  with tempfile.TemporaryDirectory() as tmp:
    rows = cases(tmp)
  print("# Bad input on the real-model path\n")
  print(
    "What each bad input to `inject`, `adapter_io` and `minilm.embed` gives now, observed by "
    "`python tools/bad_input_table.py` (which prints this file). The tests asserting each row are in "
    '`tests/test_inject_models.py` (section "bad input"), `tests/test_adapter_io.py` and '
    "`tests/test_minilm.py`. Errors are one line naming the field or file and the fix; integer ids that "
    "are traced under `jax.jit` cannot raise, so there the outputs that depend on them are NaN "
    "(`localmoe.routing.one_hot_labels`), which the trainer's divergence guard flags.\n"
  )
  print("| case | what you get now |")
  print("|---|---|")
  for case, result in rows:
    print(f"| {case} | {result.replace('|', chr(92) + '|')} |")


if __name__ == "__main__":
  main()
