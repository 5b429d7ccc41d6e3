"""The deployed model: a run's final network on a device, and what it costs there.

One concern: everything after the search that a device owner touches.

- ``export``: calibrates BatchNorm and writes TorchScript (and ONNX) with what preprocessing needs;
- ``predict``: ``fedmetanas-predict``, classifies image files with an exported model; needs only
  torch and Pillow, so it can be copied to a device on its own;
- ``latency``: per-op latency tables measured on the device (``fedmetanas profile``) and the
  latency of whole exported networks, used by a ``latency-ms`` budget.

Imported by module (``fedmetanas_core.deployment.export``); this package re-exports nothing.
"""
