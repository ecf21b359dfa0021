"""The machinery that keeps a long job alive, apart from the paper's path.

  parallel.py         the data mesh, shardings, jax.distributed start-up, agreement
  device_prefetch.py  batches put on the devices ahead of the step, on a thread
  stop_signals.py     SIGTERM / Ctrl-C: finish the step, save, exit (every process at one step)
  workdir_lock.py     one run per workdir, and a writable workdir
  profiling.py        a device profile of chosen training steps
  console.py          terminal detection; log lines kept above a progress bar
"""
