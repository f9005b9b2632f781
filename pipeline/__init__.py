"""Fine-grained image classification by transfer learning.

The pipeline has three stages that communicate through files:

``features``
    Run a pretrained Keras backbone over every image once and cache the
    embeddings in HDF5 (see :mod:`pipeline.feature_files`).
``train``
    Fit a classifier on the cached embeddings with stratified k-fold
    cross-validation.
``submit``
    Write test-set probabilities in the Kaggle submission format.
"""

__version__ = "0.1.0"
