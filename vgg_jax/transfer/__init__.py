"""The paper's transfer protocol (Appendix B): a trained net as a fixed feature extractor.

  descriptors.py  the image descriptor: the penultimate layer (fc7) run densely over the
                  whole image at several scales Q, averaged over positions and the
                  horizontal flip; cached on disk per split
  classify.py     aggregation over scales (average or stack), L2 normalisation, the linear
                  SVM (scikit-learn) and the metrics: mean class recall, mAP
  paper.py        the paper's figures for Net-D & Net-E, next to ours in the table
  __main__.py     python -m vgg_jax.transfer (absl flags, ml_collections config)
"""
