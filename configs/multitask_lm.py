r"""Multi-task instruction stream on Gemma 3 270M (a frozen decoder LM), the task id as routing context.

  python launch.py --config configs/multitask_lm.py:cpu --workdir runs/mt_lm_cpu        # 2 CPU cores: see below
  python launch.py --config configs/multitask_lm.py --workdir runs/mt_lm                # an accelerator
  python launch.py --config configs/multitask_lm.py:quick --workdir runs/mt_lm_quick    # CI: a 2-layer slice
  python launch.py --config configs/multitask_lm.py:cpu_small --workdir runs/mt_lm_small  # the run on the page

Prints the data sizes and prompt length, the baselines' per-task accuracy (zero-shot, few-shot, linear probe),
then per method the adapter parameter count, a line per evaluation (training loss, held-out accuracy per task,
router entropy and task separation where routed) and the final test accuracy; then the table (test accuracy %
per task, mean accuracy and macro-F1, mean +- std over seeds; exact match of greedy generation on a subset),
router diagnostics at init and end, and paired differences per seed. Writes results.json (only when every
method finished), results.md, history.csv and TensorBoard events (tb/, at every evaluation), accuracy.png
(held-out accuracy per evaluation, band over seeds) and routing_<method>.png (expert usage, seed 0).

The protocol, and why each choice:
- The same four tasks as the MiniLM experiment (configs/multitask_text.py), written as instructions
  (`localmoe.data.instructions`: a template per task, the answer is the class name as a word, e.g.
  "Movie review: <text>\nSentiment: positive"). One interleaved training stream (the union of the training sets,
  reshuffled every pass); the task id of each example is the routing context.
- The loss is on the answer only and over the restricted answer vocabulary: cross-entropy of the first answer
  token among the task's answer words' first tokens (distinct within a task, so the first token names the
  class). Accuracy is the same restricted choice (argmax of the answer tokens' log-likelihood at the last
  prompt position), per task, with macro-F1 (spam is imbalanced). Exact match: greedy generation over the full
  vocabulary on `eval.generate_rows` test rows per task (seed 0), the first line of the output equal to the
  answer word; it measures whether the model also writes the word, which the restricted loss does not train.
- Baselines from the frozen model, the bar every adapter must clear per task: `zero_shot` (the frozen model's
  restricted choice on the same prompts), `few_shot` (`eval.few_shot_k` demonstrations per class before each
  prompt, run once per task into a KV cache), and `linear_probe`, a logistic regression per task on the frozen
  model's final hidden state at the last prompt token, converged (L-BFGS, gradient norm < 1e-5), L2 chosen on
  held-out training rows. Adapters start at Delta W = 0, i.e. at the zero-shot function.
- CPU speed: adapters on the upper `model.num_layers - model.frozen_layers` blocks only; the lower blocks are
  frozen and unadapted in every method, so their output is computed once per example and every step runs the
  upper blocks only; prompts of at most `data.max_length` tokens (the text is cut to fit); the 262,144-row output
  projection is replaced by the answer tokens' rows (30 for the four tasks).
- Methods at parity with LoRA of rank `adapter.rank` on every adapted projection (q/k/v/o, gate/up/down):
  `localmoe.multitask` says how each splits the rank. The routed methods use the anchors' router settings
  (`_anchor`: router rate x100 through a parameter group, no router weight decay, U(-1e-3, 1e-3) start);
  `cellwise_moe_oracle` starts each task on its own expert; `cellwise_moe_activation` routes on activations (no
  task id); `per_task_lora` is the hard-routed control. Router entropy and task separation are reported at
  initialisation and at every evaluation, on `eval.diagnostic_rows` test rows. Headline: per-seed paired
  differences against LoRA and against one LoRA per task on the same test rows.

Variants:
  (default)  18 layers, adapters on the upper 6, 1,000 training rows per task (100 held out), 500 test rows per
             task, 64 tokens, 3 seeds, 10 x 100 steps of 32: meant for an accelerator; not run. Expected time, an
             extrapolation from :cpu (not measured): each step does ~15x the :cpu step's work (3x the adapted
             blocks, 2x the batch, 1.6x the tokens) for 6x the steps, ~2 days on 2 CPU cores; on one H200-class
             accelerator, under an hour.
  :cpu       the full method set on 2 idle CPU cores, meant to finish within 45 min: adapters on the upper 2 of
             18 blocks, 300 training rows per task (60 held out), 200 test rows per task, 40 tokens, 3 seeds,
             4 x 40 steps of 16. Run: 2,454 s (41 min) on 2 shared cores (docs/experiments/multitask_lm.md).
  :cpu_small the reduced variant that was run (docs/experiments/multitask_lm.md): as :cpu with the baselines
             and 3 adapter methods (lora, cellwise_moe_anchor, per_task_lora), 140 training rows per task (40 held
             out), 100 test rows per task, 4 x 25 steps of 16, generation on 5 test rows per task.
  :quick     a 2-layer slice of the real weights (adapters on block 2), 24 / 8 rows per task, 24 tokens, 1 seed,
             lora and cellwise_moe_anchor (`methods=` adds the baselines), 2 x 2 steps, generation of 1 row per
             task.
"""

import ml_collections

from localmoe import configlib

ALL_METHODS = (
  "zero_shot,few_shot,linear_probe,lora,localized_lora,blockwise_moe_anchor,cellwise_moe_anchor,"
  "cellwise_moe_oracle,cellwise_moe_activation,per_task_lora"
)


def get_config(arg=None):
  arg = configlib.parse_arg(arg, quick=False, cpu=False, cpu_small=False, methods=ALL_METHODS, seeds=3)
  config = ml_collections.ConfigDict()
  config.experiment = "multitask_lm"
  config.method_names = arg.methods
  config.seed = 0  # seeds are seed, ..., seed + num_seeds - 1 (adapter inits, batch order)
  config.num_seeds = arg.seeds
  config.checkpoint_every_epochs = 1  # orbax checkpoints in <workdir>/checkpoints/<method>; re-running resumes

  config.data = ml_collections.ConfigDict(
    dict(
      tasks="topic,spam,question,sentiment",
      train_per_task=1000,  # stratified training rows per task (0: all)
      val_per_task=100,  # training rows held out per task (probe regularisation, curves)
      test_per_task=500,  # stratified test rows per task (0: all)
      max_length=64,  # prompt tokens at most (BOS + template + text, the text cut to fit)
      seed=0,  # subsets, held-out rows, row order, few-shot demonstrations
    )
  )
  config.model = ml_collections.ConfigDict(
    dict(
      num_layers=18,  # the first n blocks of Gemma 3 270M (quick: 2)
      frozen_layers=12,  # lower blocks without adapters, computed once per example
      dtype="float32",  # compute dtype: float32 or bfloat16 (adapters keep float32 params)
    )
  )
  config.adapter = ml_collections.ConfigDict(
    dict(  # what every adapter method shares
      rank=8,  # the LoRA rank every method matches in parameters
      grid=2,  # K: a K x K grid for the localized methods
      num_experts=4,  # E per cell (routed methods)
      alpha=0.0,  # LoRA alpha; 0: alpha = r (scale 1)
    )
  )
  config.router = ml_collections.ConfigDict(
    dict(
      load_balance=0.0,  # weight of the Switch load-balance loss
      z_loss=0.0,  # weight of the router z-loss
      anchor_lr_mult=100.0,  # _anchor/_oracle methods: router learning rate / the adapters' (Poly/MHR)
      anchor_weight_decay=0.0,  # their router weight decay (Poly/MHR: none)
      anchor_init_scale=1e-3,  # their router start U(-s, s) (Poly/MHR)
      oracle_margin=2.0,  # _oracle: task t starts with logit margin m on expert t mod E
    )
  )
  config.probe = ml_collections.ConfigDict(
    dict(
      l2="1e-4,1e-3,1e-2,1e-1,1",  # candidate L2 weights; the best on held-out rows wins
      max_steps=2000,  # L-BFGS iterations at most (it stops when the gradient norm < 1e-5)
    )
  )
  config.optim = ml_collections.ConfigDict(
    dict(
      epochs=10,
      steps_per_epoch=100,
      batch_size=32,
      lr=5e-4,
      weight_decay=0.01,
      eval_batch_size=64,
      log_every=1,
      eval_train_rows=256,  # training-stream rows evaluated each time (a fixed task-balanced subset)
      test_at_end=True,  # the test split once, after training; curves from the held-out rows
      groups="",  # parameter groups (train.PRESETS names or rules); the _anchor/_oracle
      # methods add their router group first
    )
  )
  config.eval = ml_collections.ConfigDict(
    dict(
      few_shot_k=1,  # demonstrations per class in the few-shot prompt
      diagnostic_rows=64,  # test rows (round-robin over tasks) of the router diagnostics
      generate_rows=25,  # test rows per task generated greedily (exact match, seed 0); 0: skip
      max_new_tokens=6,  # tokens generated per row at most
      chunk=32,  # rows per compiled call of the frozen passes (lower blocks, baselines)
    )
  )
  if arg.cpu or arg.cpu_small:
    config.data.update(train_per_task=300, val_per_task=60, test_per_task=200, max_length=40)
    config.model.frozen_layers = 16
    config.optim.update(epochs=4, steps_per_epoch=40, batch_size=16, eval_train_rows=64)
    config.eval.update(generate_rows=10, diagnostic_rows=32)
  if arg.cpu_small:
    if arg.methods == ALL_METHODS:
      config.method_names = "zero_shot,few_shot,linear_probe,lora,cellwise_moe_anchor,per_task_lora"
    config.data.update(train_per_task=140, val_per_task=40, test_per_task=100)
    config.optim.update(steps_per_epoch=25)
    config.eval.generate_rows = 5
  if arg.quick:
    if arg.methods == ALL_METHODS:
      config.method_names = "lora,cellwise_moe_anchor"
    config.num_seeds = min(arg.seeds, 1)
    config.data.update(train_per_task=24, val_per_task=8, test_per_task=8, max_length=24)
    config.model.update(num_layers=2, frozen_layers=1)
    config.optim.update(epochs=2, steps_per_epoch=2, batch_size=8, eval_batch_size=32, eval_train_rows=16)
    config.probe.max_steps = 100
    config.eval.update(diagnostic_rows=16, generate_rows=1, max_new_tokens=3, few_shot_k=1)
  return config
