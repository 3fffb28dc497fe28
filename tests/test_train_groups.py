"""Parameter groups of the trainer (`config.optim.groups`): each group's learning-rate multiplier and weight
decay reach exactly its leaves, under vmap, schedules, clipping, checkpoints and sweeps."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from localmoe import checkpoint, sweep, train, workdir

D = 6


def tiny_task():
  """y = x @ (router/kernel + adapter/A) + extras/head/bias: three leaves in three candidate groups."""

  def init(key, frozen):
    k1, k2 = jax.random.split(key)
    return {
      "adapter": {
        "layer": {"router": {"kernel": 0.3 * jax.random.normal(k1, (D, 1))}, "A": 0.3 * jax.random.normal(k2, (D, 1))}
      },
      "extras": {"head": {"bias": jnp.full((1,), 0.5)}},
    }

  def predict(p, frozen, inputs):
    layer = p["adapter"]["layer"]
    return inputs["x"] @ (layer["router"]["kernel"] + layer["A"]) + p["extras"]["head"]["bias"]

  return train.Task(init=init, predict=predict)


def tiny_data(n=16):
  r = np.random.default_rng(0)
  x = r.standard_normal((n, D)).astype(np.float32)
  y = (x @ r.standard_normal((D, 1)) + 1.0).astype(np.float32)
  return train.Data(train={"x": x, "y": y}, test={"x": x, "y": y})


GROUPS = [
  dict(name="router", pattern=r".*/router/.*", lr_mult=100.0, weight_decay=0.0),
  dict(name="head", pattern=r"extras/.*", lr_mult=0.5),
]


def settings(**kw):
  base = dict(epochs=1, batch_size=16, learning_rate=1e-3, weight_decay=0.1, log_every=1)
  base.update(kw)
  return train.Settings(**base)


def hand_adamw_first_step(p, g, lr, wd, eps=1e-8):
  """AdamW's first update by hand: m_hat = g, v_hat = g^2, so p - lr (g / (|g| + eps) + wd p)."""
  return p - lr * (g / (np.abs(g) + eps) + wd * p)


def first_step_by_hand(task, data, lr, wd, mults, decays):
  params = task.init(jax.random.fold_in(jax.random.PRNGKey(0), 0), None)
  loss = lambda p: jnp.mean((task.predict(p, None, {"x": data.train["x"]}) - data.train["y"]) ** 2)
  grads = jax.grad(loss)(params)
  out = {}
  for path, group in (("router", "router"), ("A", "rest"), ("bias", "head")):
    p = {
      "router": params["adapter"]["layer"]["router"]["kernel"],
      "A": params["adapter"]["layer"]["A"],
      "bias": params["extras"]["head"]["bias"],
    }[path]
    g = {
      "router": grads["adapter"]["layer"]["router"]["kernel"],
      "A": grads["adapter"]["layer"]["A"],
      "bias": grads["extras"]["head"]["bias"],
    }[path]
    out[path] = hand_adamw_first_step(np.asarray(p), np.asarray(g), lr * mults[group], decays[group])
  return out


def leaves(params, k=0):
  layer = params["adapter"]["layer"]
  return {
    "router": np.asarray(layer["router"]["kernel"][k]),
    "A": np.asarray(layer["A"][k]),
    "bias": np.asarray(params["extras"]["head"]["bias"][k]),
  }


@pytest.mark.slow
def test_group_multiplier_and_weight_decay_reach_exactly_their_leaves():
  task, data = tiny_task(), tiny_data()
  fit = train.fit(task, data, [0], settings(groups=train.parse_groups(GROUPS)), log=None)
  want = first_step_by_hand(
    task,
    data,
    1e-3,
    0.1,
    mults={"router": 100.0, "rest": 1.0, "head": 0.5},
    decays={"router": 0.0, "rest": 0.1, "head": 0.1},
  )
  got = leaves(fit.params)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
  # Without groups every leaf gets the base update: the router moved 100x less.
  plain = leaves(train.fit(task, data, [0], settings(), log=None).params)
  start = task.init(jax.random.fold_in(jax.random.PRNGKey(0), 0), None)["adapter"]["layer"]["router"]["kernel"]
  moved = lambda p: np.abs(p - np.asarray(start)).max()
  assert moved(got["router"]) > 50 * moved(plain["router"])


@pytest.mark.slow
def test_vmapped_entries_with_different_base_rates_keep_their_groups():
  task, data = tiny_task(), tiny_data()
  rates = [1e-3, 3e-4]
  fit = train.fit(task, data, [0, 0], settings(groups=train.parse_groups(GROUPS)), learning_rate=rates, log=None)
  for k, lr in enumerate(rates):
    want = first_step_by_hand(
      task,
      data,
      lr,
      0.1,
      mults={"router": 100.0, "rest": 1.0, "head": 0.5},
      decays={"router": 0.0, "rest": 0.1, "head": 0.1},
    )
    got = leaves(fit.params, k)
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=f"entry {k} {name}")


@pytest.mark.slow
def test_frozen_group_and_schedule_and_clipping_work_with_groups():
  task, data = tiny_task(), tiny_data()
  groups = train.parse_groups([dict(name="head", pattern=r"extras/.*", freeze=True)])
  fit = train.fit(
    task, data, [0], settings(epochs=3, groups=groups, schedule="cosine", warmup_steps=1, grad_clip=0.5), log=None
  )
  assert np.all(np.asarray(fit.params["extras"]["head"]["bias"]) == 0.5)  # never updated
  start = task.init(jax.random.fold_in(jax.random.PRNGKey(0), 0), None)["adapter"]["layer"]["A"]
  assert np.abs(np.asarray(fit.params["adapter"]["layer"]["A"][0]) - np.asarray(start)).max() > 0
  assert fit.status == ["ok"]


@pytest.mark.slow
def test_no_groups_is_bit_identical_to_a_rule_that_changes_nothing():
  task, data = tiny_task(), tiny_data()
  plain = train.fit(task, data, [0, 1], settings(epochs=2), log=None)
  same = train.fit(
    task,
    data,
    [0, 1],
    settings(epochs=2, groups=train.parse_groups([dict(name="all_adapter", pattern=r"adapter/.*")])),
    log=None,
  )
  np.testing.assert_allclose(plain.history, same.history, rtol=1e-6)


def test_unmatched_rule_is_an_error_naming_it(capsys):
  groups = train.parse_groups([dict(name="router", pattern=r".*/routers?/nothing")])
  with pytest.raises(ValueError, match=r"rule 'router' .* matches no trainable parameter.*adapter/layer"):
    train.fit(tiny_task(), tiny_data(), [0], settings(groups=groups), log=None)


@pytest.mark.slow
def test_each_group_is_printed_once_with_its_count():
  lines = []
  train.fit(tiny_task(), tiny_data(), [0], settings(epochs=2, groups=train.parse_groups(GROUPS)), log=lines.append)
  group_lines = [l for l in lines if "parameter groups" in l]
  assert group_lines == [
    "  [model] parameter groups: router 6 (lr x100, weight decay 0); head 1 (lr x0.5); rest 6 (base settings)"
  ]


@pytest.mark.parametrize(
  "groups, match",
  [
    ([dict(pattern="(")], r"groups\[0\].pattern='\(' is not a valid regex"),
    ([dict(name="a")], r"groups\[0\] needs a 'pattern'"),
    ([dict(pattern="x", lr=3)], r"groups\[0\] has unknown key\(s\) \['lr'\]"),
    ([dict(pattern="x", lr_mult=0)], r"lr_mult=0 must be a finite number > 0"),
    ([dict(pattern="x", weight_decay=-1)], r"weight_decay=-1 must be a finite number >= 0"),
    ([dict(name="a", pattern="x"), dict(name="a", pattern="y")], r"group name 'a' is used twice"),
    ("nosuch", r"unknown preset\(s\) \['nosuch'\]"),
  ],
)
def test_bad_rules_are_one_clear_error(groups, match):
  with pytest.raises(ValueError, match=match):
    train.parse_groups(groups)


def test_groups_from_config_list_dict_and_presets():
  optim = ml_collections.ConfigDict(dict(epochs=1, batch_size=4, lr=1e-3))
  optim.groups = ml_collections.ConfigDict()
  optim.groups.router = dict(pattern=r".*/router/.*", lr_mult=100.0)
  optim.groups.head = dict(pattern=r"extras/.*", weight_decay=0.0)
  rules = train.Settings.from_config(optim).groups
  assert [r.name for r in rules] == ["router", "head"]  # the order written, not sorted
  assert [r.name for r in train.parse_groups("poly_router+lora_plus")] == ["router", "lora_b"]
  assert train.parse_groups([]) == ()


# (preset, rule name, lr_mult, weight decay, paths it must take, paths it must leave) over both kinds of tree:
# one adapter's own params (single-layer experiments) and inject's (adapter/<layer>/..., extras/<module>/...).
PRESET_CONTENTS = [
  (
    "poly_router",
    "router",
    100.0,
    0.0,
    ["router/kernel", "adapter/encoder/layer_0/query/router/kernel"],
    ["A", "B", "adapter/encoder/layer_0/query/A", "extras/head_0/kernel", "routers/kernel"],
  ),
  (
    "heads_slow",
    "heads",
    0.1,
    None,
    ["extras/head_0/kernel", "extras/head_1/bias"],
    ["A", "router/kernel", "adapter/layer/B"],
  ),
  ("heads_no_decay", "heads", 1.0, 0.0, ["extras/head_0/kernel"], ["A", "adapter/layer/B"]),
  (
    "lora_plus",
    "lora_b",
    16.0,
    None,
    ["B", "adapter/encoder/layer_0/query/B"],
    ["A", "adapter/encoder/layer_0/query/A", "router/kernel", "extras/head/B"],
  ),
]


@pytest.mark.parametrize(
  "preset, name, lr_mult, weight_decay, takes, leaves", PRESET_CONTENTS, ids=[c[0] for c in PRESET_CONTENTS]
)
def test_presets_hold_the_anchors_settings_and_match_both_kinds_of_tree(
  preset, name, lr_mult, weight_decay, takes, leaves
):
  assert sorted(train.PRESETS) == sorted(c[0] for c in PRESET_CONTENTS)
  (rule,) = train.parse_groups(preset)
  assert (rule.name, rule.lr_mult, rule.weight_decay, rule.freeze) == (name, lr_mult, weight_decay, False)
  for path in takes:
    assert train.group_of((rule,), path) == name, path
  for path in leaves:
    assert train.group_of((rule,), path) == train.REST, path


def test_rules_match_the_whole_path_and_the_first_matching_rule_wins():
  rules = train.parse_groups(
    [
      dict(name="router", pattern="router"),  # a substring of the paths
      dict(name="first", pattern=r"adapter/.*", lr_mult=2.0),
      dict(name="second", pattern=r"adapter/.*/A", lr_mult=3.0),
    ]
  )
  assert train.group_of(rules, "adapter/layer/router/kernel") == "first"  # not 'router': a full match
  assert train.group_of(rules, "router") == "router"
  assert train.group_of(rules, "adapter/layer/A") == "first"  # both match: the first wins
  assert train.group_of(rules, "extras/head/bias") == train.REST
  # The optimiser follows the labels: one AdamW step moves adapter/layer/A at the first rule's rate (x2).
  params = {
    "adapter": {"layer": {"A": jnp.ones((3,)), "router": {"kernel": jnp.ones((2,))}}},
    "extras": {"head": {"bias": jnp.ones((1,))}},
  }
  s = settings(groups=rules, weight_decay=0.0)
  tx = train.make_optimizer(s, total_steps=4)
  state = tx.init(params)
  train.set_hyperparams(state, s, 1e-2, 0.0)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["adapter"]["layer"]["A"], -2e-2, rtol=1e-5)
  np.testing.assert_allclose(updates["adapter"]["layer"]["router"]["kernel"], -2e-2, rtol=1e-5)
  np.testing.assert_allclose(updates["extras"]["head"]["bias"], -1e-2, rtol=1e-5)


def _updates(s, steps=4):
  """The updates of `steps` AdamW steps of make_optimizer(s) on a fixed tree with large, changing gradients."""
  params = {"adapter": {"layer": {"A": jnp.ones((3,)), "router": {"kernel": jnp.ones((2,))}}}}
  tx = train.make_optimizer(s, total_steps=steps)
  state = tx.init(params)
  train.set_hyperparams(state, s, 1e-2, 0.0)
  out = []
  for k in range(steps):
    grads = {
      "adapter": {
        "layer": {
          "A": jnp.asarray([3.0, -4.0, 12.0]) * (k + 1),
          "router": {"kernel": jnp.asarray([0.5, -1.0]) / (k + 1)},
        }
      }
    }
    updates, state = tx.update(grads, state, params)
    out.append(np.concatenate([np.ravel(u) for u in jax.tree_util.tree_leaves(updates)]))
  return np.stack(out)


@pytest.mark.parametrize(
  "extra",
  [
    dict(grad_clip=0.5),
    dict(schedule="cosine"),
    dict(schedule="linear"),
    dict(warmup_steps=2),
    dict(grad_clip=0.5, schedule="cosine", warmup_steps=1),
  ],
  ids=["clip", "cosine", "linear", "warmup", "all"],
)
def test_clipping_schedule_and_warmup_still_apply_with_groups(extra):
  rule = [dict(name="router", pattern=r".*/router/.*")]  # lr x1: changes nothing
  with_groups = _updates(settings(weight_decay=0.0, groups=train.parse_groups(rule), **extra))
  without = _updates(settings(weight_decay=0.0, **extra))
  bare = _updates(settings(weight_decay=0.0, groups=train.parse_groups(rule)))
  np.testing.assert_allclose(with_groups, without, rtol=1e-6, atol=1e-9)
  assert np.abs(with_groups - bare).max() > 1e-4  # the option acts
  if "warmup_steps" in extra:
    assert np.all(with_groups[0] == 0.0)  # warmup starts from 0


def test_resuming_under_changed_groups_is_refused(tmp_path):
  task, data = tiny_task(), tiny_data()
  config = {"optim": {"groups": [GROUPS[0]]}}
  policy = checkpoint.Policy(str(tmp_path), every_epochs=1, config=config)
  train.fit(task, data, [0], settings(epochs=1, groups=train.parse_groups([GROUPS[0]])), checkpoints=policy, log=None)
  changed = {"optim": {"groups": [dict(GROUPS[0], lr_mult=10.0)]}}
  with pytest.raises(workdir.ConfigMismatchError, match="lr_mult"):
    train.fit(
      task,
      data,
      [0],
      settings(epochs=2, groups=train.parse_groups(changed["optim"]["groups"])),
      checkpoints=checkpoint.Policy(str(tmp_path), every_epochs=1, config=changed),
      log=None,
    )


def test_a_sweep_can_set_a_named_groups_multiplier():
  config = ml_collections.ConfigDict(dict(optim=dict(lr=1e-3, groups=dict(router=dict(pattern="r", lr_mult=1.0)))))
  swept = sweep.apply_overrides(config, {"optim.groups.router.lr_mult": 100.0})
  assert swept.optim.groups.router.lr_mult == 100.0
  listed = ml_collections.ConfigDict(dict(optim=dict(groups=[dict(name="router", pattern="r", lr_mult=1.0)])))
  swept = sweep.apply_overrides(listed, {"optim.groups.router.lr_mult": 100.0})
  assert swept.optim.groups[0]["lr_mult"] == 100.0 and listed.optim.groups[0]["lr_mult"] == 1.0


# ------------------------------------------------------------------------------------------- routers that learn


def context_routed_problem(n=256, d=8, contexts=4, seed=0):
  """y = W_c x with an independent W_c per context c: a task a context router can specialise on."""
  r = np.random.default_rng(seed)
  x = r.standard_normal((n, d)).astype(np.float32)
  c = r.integers(0, contexts, n)
  w = r.standard_normal((contexts, d, d)).astype(np.float32) / np.sqrt(d)
  y = np.einsum("nod,nd->no", w[c], x).astype(np.float32)
  ctx = np.eye(contexts, dtype=np.float32)[c]
  split = {"x": x[:192], "context": ctx[:192], "y": y[:192]}, {"x": x[192:], "context": ctx[192:], "y": y[192:]}
  return train.Data(train=split[0], test=split[1], frozen={"w0": np.zeros((d, d), np.float32)})


def routed_task(d=8, contexts=4):
  import localmoe as lm
  from localmoe import routing, single_layer

  module = lm.make(
    dict(
      method="cellwise_moe",
      d_in=d,
      d_out=d,
      k_y=2,
      k_x=2,
      rank=1,
      num_experts=4,
      router_input="context",
      context_dim=contexts,
      router_init="uniform",
    )
  )
  base = single_layer.layer_task(module, d, contexts)

  def diagnostics(params, frozen, inputs):
    _, state = module.apply({"params": params}, inputs["x"], inputs["context"], mutable=["intermediates"])
    gates = jnp.stack([r.gates for r in lm.collect_router_outputs(state["intermediates"])])
    return {"entropy_nats": routing.gate_entropy(gates)}

  return dataclasses.replace(base, diagnostics=diagnostics), module


@pytest.mark.slow
def test_anchors_router_rate_moves_the_routers_and_the_default_does_not():
  data = context_routed_problem()
  task, module = routed_task()
  base = dict(epochs=4, batch_size=32, learning_rate=1e-3, weight_decay=0.01, log_every=1)
  anchors = train.Settings(
    **base,
    groups=train.parse_groups([dict(name="router", pattern=r".*router/kernel", lr_mult=100.0, weight_decay=0.0)]),
  )
  default = train.fit(task, data, [0], train.Settings(**base), log=None)
  anchored = train.fit(task, data, [0], anchors, log=None)
  # The diagnostics at initialisation equal a direct computation on the seed's initial params.
  params0 = task.init(jax.random.fold_in(jax.random.PRNGKey(0), 0), None)
  direct = task.diagnostics(params0, None, {k: jnp.asarray(v) for k, v in data.test.items() if k != "y"})
  np.testing.assert_allclose(
    default.initial_diagnostics["entropy_nats"][0], direct["entropy_nats"], rtol=1e-5
  )  # two compiled programs: float32 rounding may differ
  np.testing.assert_allclose(anchored.initial_diagnostics["entropy_nats"], default.initial_diagnostics["entropy_nats"])
  start = float(default.initial_diagnostics["entropy_nats"][0])
  assert abs(start - np.log(4)) < 1e-3  # U(-1e-3, 1e-3): uniform gates
  drop_default = start - float(default.diagnostics["entropy_nats"][0, -1])
  drop_anchored = start - float(anchored.diagnostics["entropy_nats"][0, -1])
  assert drop_anchored >= 0.1, drop_anchored
  assert drop_default < 0.1, drop_default


# ------------------------------------------------------------------------------------------- test_at_end


@pytest.mark.slow
def test_test_at_end_evaluates_the_test_split_once_and_changes_nothing_else():
  task = tiny_task()
  data = tiny_data()
  data = dataclasses.replace(data, val={k: v[:8] for k, v in data.train.items()})
  every = train.fit(task, data, [0, 1], settings(epochs=3), log=None)
  at_end = train.fit(task, data, [0, 1], settings(epochs=3, test_at_end=True), log=None)
  assert at_end.splits == ("train", "val", "test")
  test = at_end.splits.index("test")
  assert np.isnan(at_end.history[:, :2, test]).all()  # no test pass before the last evaluation
  np.testing.assert_array_equal(at_end.history[:, -1, test], every.history[:, -1, test])  # the same final numbers
  np.testing.assert_array_equal(at_end.history[:, :, :test], every.history[:, :, :test])  # train / val curves
  for a, b in zip(jax.tree_util.tree_leaves(at_end.params), jax.tree_util.tree_leaves(every.params)):
    np.testing.assert_array_equal(a, b)  # training unchanged
