"""Lab 06: k-means (local, GPU, distributed) and cluster-then-label.

* :mod:`.estimator` — ``KMeans`` in PyTorch (Lloyd, greedy k-means++, scikit-learn's tolerance,
  empty clusters relocated, chunked assignment, CPU/GPU, float32/float64), ``assign``, ``kmeans_plusplus``;
* :mod:`.loop` — the Lloyd loop and its two steps, shared by one process and many ranks;
* :mod:`.distributed` — the same loop over ranks (sums and counts all-reduced, k(d+1) numbers per
  iteration), the init broadcast from rank 0, and k-means|| (Bahmani et al. 2012) across ranks;
* :mod:`.cluster_label` — cluster-then-label (majority label per cluster), instrumented;
* :mod:`.datasets` — the digits and a generated set of any size (``load``, read through ``lab``);
* :mod:`.lab` — rank functions, exercise checks, the notebook's runners, tour; :mod:`.plots`; :mod:`.bench`.
"""
from .cluster_label import ClusterLabelResult, cluster_then_label, cluster_then_label_method, label_clusters
from .distributed import centroid_update, fit_distributed, kmeans_parallel, shard, shard_bounds
from .estimator import KMeans, assign, kmeans_plusplus, lloyd, tolerance

__all__ = ["KMeans", "assign", "kmeans_plusplus", "lloyd", "tolerance", "fit_distributed", "kmeans_parallel",
           "centroid_update", "shard", "shard_bounds", "cluster_then_label", "cluster_then_label_method",
           "label_clusters", "ClusterLabelResult"]
