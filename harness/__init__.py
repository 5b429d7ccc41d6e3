"""The harness around the Flower app: how people and tests run it, not what a run is.

- ``cli``: the ``fedmetanas`` command (validate a run config, run the app with ``flwr run``,
  check the run finished; ``check`` and ``profile``);
- ``simulation``: the same ServerApp and ClientApp in-process through Flower's simulation engine
  (tests, benchmarks, fault injection);
- ``local_grid``: a Grid that hands every message to the real ClientApp in this process (no Ray).

It depends on the apps (``server_app``, ``client_app``) and the core; nothing in the apps, the
core or ``flower_records`` imports it (``tests/test_layering.py``). It is not part of the FAB:
SuperNodes run the apps, never the harness.
"""
