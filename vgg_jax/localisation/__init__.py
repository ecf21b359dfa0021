"""Object localisation, the paper's Appendix A (the ILSVRC-2014 winning entry).

The same nets, data path, loop, checkpoints and evaluation machinery as classification;
the last layer regresses boxes (config.model.box_regression). One idea per file:

  boxes.py        boxes in pixels, edges and window fractions; rescale, crop, flip and back
  annotations.py  ILSVRC's XML and Kaggle's CSV, faults clipped or skipped and counted
  source.py       a split's images joined with their boxes by file name
  canvas.py       the offline task: the digits pasted on cluttered canvases
  regression.py   the box head: targets of a training crop, the Euclidean loss, its sums
  metric.py       ILSVRC's IoU (inclusive-pixel areas) and the 5-guess error
  merging.py      OverFeat's greedy merging of one class's boxes
  dense.py        dense outputs mapped back to image coordinates; an image's guesses
  protocols.py    the paper's test protocols 1 (central crop, true class) and 2 (dense)
  evaluator.py    the protocols run over a split, every image counted once
  results.py      result rows, the paper's Tables 8-10 beside them, loc_results.json
  training.py     what the training loop takes from localisation (data, loss, metrics)
  run.py          --mode=eval of a localisation run
  drawing.py      guesses drawn into an image file (python -m vgg_jax.predict --draw_boxes)
"""
