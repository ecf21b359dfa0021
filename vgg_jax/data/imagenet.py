"""Constants of the ILSVRC-2012 (ImageNet) training set that preprocessing uses.

The paper's recipe (configs/base.py) and the torchvision conversion import them from here,
so the library never reaches into the experiment configs.
"""

# Mean RGB of the ILSVRC-2012 training images, 0-255 scale: the paper's only preprocessing
# (3.1) subtracts it from every pixel.
MEAN_RGB = (123.68, 116.78, 103.94)
# Principal components of ImageNet pixel RGB values (0-1 scale), from AlexNet (Krizhevsky
# et al. 2012), whose colour augmentation the paper adopts: the eigenvalues, and their
# eigenvectors as columns.
PCA_EIGENVALUES = (0.2175, 0.0188, 0.0045)
PCA_EIGENVECTORS = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
# torchvision's normalisation of its ImageNet weights, 0-1 scale (its documentation):
# per-channel mean and standard deviation of the training images.
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
