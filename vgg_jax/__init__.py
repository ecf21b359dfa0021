"""vgg-jax: the VGG paper (Simonyan & Zisserman, 2015) in JAX and Flax."""

__version__ = "0.1.0"
