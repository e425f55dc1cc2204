"""On-demand, attack-based health probes of a served model.

A probe attacks the archive's held-out probe set inside the server with gradients from the TorchScript twin,
scores the adversarial examples with the serving session too (white-box and transfer figures), and reports
clean and robust accuracy (classifiers) or Recall@1, embedding shift and ERS-lite (embedders), with everything
needed to reproduce it. :mod:`.params` holds the request schema and the limits, :mod:`.measure` the measurement
(host-agnostic, also run offline by ``robustserve probe`` and ``robustserve gate``), :mod:`.history` the
append-only report history and the one-probe-at-a-time gate, :mod:`.runner` the background runner a server uses.
"""
