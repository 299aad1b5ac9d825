"""Training and evaluation: the matcher and set loss, the training loop and its runs, time
budgets, presets, COCO evaluation and its report, prediction, and the run folder's files and
figures."""
