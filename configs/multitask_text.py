r"""Multi-task text stream on a frozen pretrained MiniLM-L6 (all-MiniLM-L6-v2), the task id as routing context.

  python launch.py --config configs/multitask_text.py:cpu --workdir runs/multitask_cpu  # <= 30 min on 2 CPU cores
  python launch.py --config configs/multitask_text.py --workdir runs/multitask          # full data: an accelerator
  python launch.py --config configs/multitask_text.py:quick --workdir runs/mt_quick     # CI: seconds
  python launch.py --config configs/multitask_text.py:cpu,methods=lora+cellwise_moe_anchor,seeds=1 --workdir runs/x

Prints the data sizes, the linear probe's per-task accuracy and chosen regularisation, then per method the
parameter counts (and parameter groups), progress lines (training loss, validation accuracy, router entropy
and task separation where routed) and the final test accuracy; then the table (test accuracy % per task,
mean accuracy and macro-F1, mean +- std over seeds, router diagnostics at init and end, step time against
LoRA's) and the paired differences per seed. Writes results.json, results.md, history.csv and TensorBoard
events (tb/, both at every evaluation), accuracy.png (validation accuracy per evaluation, band over seeds),
loss.png (training loss), routing_<method>.png (expert usage per layer, cell and task, seed 0).

The protocol (why it can rank adapters, which the earlier one could not):
- A converged baseline: `linear_probe`, a logistic-regression head per task on the frozen model's mean-pooled
  features (computed once), trained to convergence (L-BFGS, gradient norm < 1e-5), its L2 weight chosen
  on held-out training rows (`data.val_per_task` per task; never on test), then refitted on all training rows.
- Heads start from the probe (LP-FT, `model.heads="probe"`): every method begins at the probe's function
  (adapters start at Delta W = 0), so a method below the probe lost ground by training, not by a slower start.
- Adapters on the upper layers only (`model.frozen_layers`): the lower layers are frozen and unadapted in every
  method, so their output is computed once per example and the step runs only the upper layers; the time
  saved buys more training rows and steps.
- The routers can learn: the `_anchor` methods use the anchors' router settings (Poly/MHR: router rate 100x
  the adapters' through a parameter group, no router weight decay, U(-1e-3, 1e-3) start); `_oracle` starts
  each task on its own expert (task-aligned init, margin `router.oracle_margin`) with the anchors' rate.
  Router entropy and task separation are reported at initialisation and at every evaluation.
- Enough test rows to resolve a point: `data.test_per_task` per task (stratified), evaluated once at the end
  (`optim.test_at_end`); intermediate evaluations use the held-out training rows. Headline comparisons are
  paired differences per seed on the same test rows.

Data (`localmoe.data.text`): 20 Newsgroups (topic, 20 classes), SMS Spam (2), TREC-6 (question type, 6),
Rotten Tomatoes (sentiment, 2), read offline from PyPI wheels. The training stream is the union of the
training sets, reshuffled every pass, so each example's task is random; the task id is the context.

Parity (`config.adapter`): every method spends the parameters of LoRA with rank `rank` on each adapted layer:
Localized LoRA rank/grid per cell of a grid x grid grid; the LoRA-MoEs num_experts experts of rank
rank/(grid*num_experts) per cell (+ routers); one LoRA per task of rank rank/tasks each.

Variants:
  (default)  all training data, 128 tokens, adapters on all 6 layers, 3 seeds, 10 x 200 steps of 32, all test
             rows: meant for an accelerator. Its time has not been measured (no accelerator was available):
             `python benchmarks/model_step.py` times one step at 32 x 128 tokens on the machine at hand;
             multiply by 3 seeds and 2,000 steps per method.
  :cpu       1,000 training rows per task (80 of them held out), 1,000 test rows per task (stratified),
             32 tokens, adapters on the upper 2 of 6 layers, 3 seeds, 4 x 40 steps of 32, lr 5e-4: 16 min
             on 2 CPU cores (README).
  :quick     a 2-layer slice of the real weights (adapters on layer 2), 32 / 16 rows per task, 16 tokens, 2 seeds.
"""

import ml_collections

from localmoe import configlib

ALL_METHODS = (
  "heads_only,linear_probe,lora,localized_lora,blockwise_moe,cellwise_moe,blockwise_moe_anchor,"
  "cellwise_moe_anchor,cellwise_moe_oracle,cellwise_moe_activation,per_task_lora"
)


def get_config(arg=None):
  arg = configlib.parse_arg(arg, quick=False, cpu=False, methods=ALL_METHODS, seeds=3)
  config = ml_collections.ConfigDict()
  config.experiment = "multitask_text"
  config.method_names = arg.methods
  config.seed = 0  # seeds are seed, ..., seed + num_seeds - 1 (adapter inits, batch order)
  config.num_seeds = arg.seeds
  config.checkpoint_every_epochs = 1  # orbax checkpoints in <workdir>/checkpoints/<method>; re-running resumes

  config.data = ml_collections.ConfigDict(
    dict(
      tasks="topic,spam,question,sentiment",
      train_per_task=0,  # 0: every training row; n: a stratified subset of n per task
      val_per_task=100,  # training rows held out per task (probe regularisation, curves)
      test_per_task=0,  # 0: every test row; n: a stratified subset of n per task
      max_length=128,  # word pieces per input ([CLS] and [SEP] included); sentence-transformers' 128
      seed=0,  # subsets, held-out rows and the order of the evaluated rows
    )
  )
  config.model = ml_collections.ConfigDict(
    dict(
      num_layers=6,  # the first n layers of MiniLM-L6 (quick: 2)
      frozen_layers=0,  # lower layers without adapters, computed once per example
      dtype="float32",  # backbone compute dtype: float32 or bfloat16 (adapters keep float32 params)
      heads="probe",  # task heads start from the linear probe ("probe", LP-FT) or N(0, 0.02^2)
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
      load_balance=0.0,  # weight of the Switch load-balance loss (per cell; global for block-wise)
      z_loss=0.0,  # weight of the router z-loss
      anchor_lr_mult=100.0,  # _anchor/_oracle methods: router learning rate / the adapters' (Poly/MHR)
      anchor_weight_decay=0.0,  # their router weight decay (Poly/MHR: none)
      anchor_init_scale=1e-3,  # their router start U(-s, s) (Poly/MHR)
      oracle_margin=2.0,  # _oracle: task t starts with logit margin m on expert t mod E
    )
  )
  config.probe = ml_collections.ConfigDict(
    dict(
      l2="1e-4,1e-3,1e-2,1e-1,1",  # candidate L2 weights (on the mean loss); the best on held-out rows wins
      max_steps=2000,  # L-BFGS iterations at most (it stops when the gradient norm < 1e-5)
    )
  )
  config.optim = ml_collections.ConfigDict(
    dict(
      epochs=10,  # evaluations; each after steps_per_epoch steps
      steps_per_epoch=200,
      batch_size=32,
      lr=5e-4,
      weight_decay=0.01,
      eval_batch_size=256,
      log_every=1,
      eval_train_rows=1024,  # training-stream rows evaluated each time (a fixed task-balanced subset)
      test_at_end=True,  # the test split once, after training; curves from the held-out rows
      # Parameter groups of every method (train.PRESETS names joined by "+", or rules); the _anchor methods add
      # their router group first.
      groups=configlib.groups_field("heads_slow"),
    )
  )
  config.eval = ml_collections.ConfigDict(
    dict(
      step_time_repeats=5,  # time this many compiled training steps per method (0: skip)
      diagnostic_rows=256,  # test rows (round-robin over tasks) of the router diagnostics
    )
  )
  if arg.cpu:
    config.data.train_per_task = 1000
    config.data.val_per_task = 80
    config.data.test_per_task = 1000
    config.data.max_length = 32
    config.model.frozen_layers = 4
    config.optim.epochs = 4
    config.optim.steps_per_epoch = 40
    config.optim.eval_train_rows = 256
    config.eval.step_time_repeats = 0  # step times: benchmarks/model_step.py (a timed step compiles once more)
  if arg.quick:
    config.method_names = arg.methods if arg.methods != ALL_METHODS else "linear_probe,lora,cellwise_moe_anchor"
    config.num_seeds = min(arg.seeds, 2)
    config.model.num_layers = 2
    config.model.frozen_layers = 1
    config.data.train_per_task = 32
    config.data.val_per_task = 8
    config.data.test_per_task = 16
    config.data.max_length = 16
    config.optim.batch_size = 8
    config.optim.epochs = 2
    config.optim.steps_per_epoch = 2
    config.optim.eval_batch_size = 32
    config.optim.eval_train_rows = 32
    config.probe.max_steps = 200
    config.eval.step_time_repeats = 0
    config.eval.diagnostic_rows = 32
  return config
