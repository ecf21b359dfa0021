"""The paper's test protocols (section 3.2) and training's validation, on one evaluator.

  protocols.py  what each protocol computes: components, views, flips, test scales, the
                device function from views to class probabilities
  plan.py       image ownership per process, view-shape buckets, padded batches
  metrics.py    the one top-k and the metric sums (training uses them too)
  evaluator.py  EvalNet and Evaluator: nets run over a split (validation and --mode=eval)
  results.py    result rows (frozen dataclasses), their accumulator, table and files
  paper.py      the paper's Tables 3-6 and which rows they match
  run.py        --mode=eval: checkpoints loaded, evaluated, results written
  report.py     several runs' evaluations against the paper (command line)
"""
