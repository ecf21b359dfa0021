"""Training: the paper's recipe (3.1) as a loop, and what a run keeps on disk.

  loop.py                 set-up, resume, the step's phases, validation, the plateau rule
  state.py                the train state and its initialisation on the mesh
  step.py                 the jitted train step (loss, gradient, update)
  task.py                 classification or localisation: what the loop takes from its task
  run_state.py            the run state (train state, plateau, data position, last
                          validation, step), saved and restored whole; mismatches named
  progress.py             the run's step counts, when it is finished, the lines that say so
  optim.py                the optax chain, the plateau rule, the learning rate
  checkpoint.py           orbax checkpoints: save, restore, best (validated) and latest
  checkpoint_recovery.py  unfinished or damaged steps moved aside; the newest that restores
  warm_start.py           starting from another net's checkpoint: layers copied or skipped
  writers/                console, JSON lines and wandb behind one interface
"""
