"""What adapting a backbone costs it elsewhere: frozen features scored by k-NN on probe tasks.

Tensors and modules in, numbers out (the retention job in ``vpeft.jobs`` reads records, files and data):

- ``knn_top1``: DINO's weighted k-NN classifier (Caron et al., 2021; k=20, cosine similarity,
  votes weighted by exp(similarity / 0.07)) fit on one split's features, scored on another's;
- ``extract_features``: a model's pre-logit features (what its head reads) of a uint8 split;
- ``retention``: adapted k-NN top-1 over the bare backbone's, per probe task and their mean.
"""

from vpeft.probe.features import extract_features
from vpeft.probe.knn import KNN_K, KNN_TEMPERATURE, knn_predict, knn_top1, retention

__all__ = ["KNN_K", "KNN_TEMPERATURE", "extract_features", "knn_predict", "knn_top1", "retention"]
