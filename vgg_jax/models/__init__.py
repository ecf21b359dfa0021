"""The paper's nets (Table 1) and what a config makes of them.

  vgg.py          the six configurations A, A-LRN, B, C, D, E as one flax module: LRN, the
                  dense (fully-convolutional) view, batch norm, named features
  from_config.py  config.model's rules, the layers fine-tuning names, the configured net
                  (a classifier, or a box regressor for localisation)
  flops.py        analytic MAC/FLOP counts of a net
"""

from vgg_jax.models.from_config import (
    BOX_COORDINATES,
    BOX_REGRESSIONS,
    PER_CLASS,
    SINGLE_CLASS,
    check_config,
    check_frozen_layers,
    compute_dtype,
    create_model_from_config,
    head_width,
    is_box_regressor,
    parameter_layers,
    select_layers,
)
from vgg_jax.models.vgg import (
    ARCHITECTURES,
    BN_SUFFIX,
    HEAD_LAYERS,
    TOTAL_STRIDE,
    VERSIONS,
    VGG,
    canonical_version,
    count_parameters,
    create_model,
    kernel_initializer,
    layer_names,
    local_response_norm,
)

__all__ = ["ARCHITECTURES", "BN_SUFFIX", "BOX_COORDINATES", "BOX_REGRESSIONS", "HEAD_LAYERS",
           "PER_CLASS", "SINGLE_CLASS", "TOTAL_STRIDE", "VERSIONS", "VGG", "canonical_version",
           "check_config", "check_frozen_layers", "compute_dtype", "count_parameters",
           "create_model", "create_model_from_config", "head_width", "is_box_regressor",
           "kernel_initializer", "layer_names", "local_response_norm", "parameter_layers",
           "select_layers"]
