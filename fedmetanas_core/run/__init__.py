"""A run: what it is asked to do, and what it leaves behind.

One concern: the run as the user sees it, its configuration in and its files out.

- ``config_keys``: the run-config key table (every key, type, default, allowed values, meaning;
  ``METHODS``);
- ``config``: ``RunConfig``, a flat mapping validated once, up front, against that table
  (``python -m fedmetanas_core.run.config [--toml]`` prints the table);
- ``node_config``: a SuperNode's ``--node-config``, checked before any data is loaded;
- ``outputs``: config.yaml, rounds.jsonl, summary.json, genotype.yaml, the derived model and the
  checkpoint, written atomically.

Imported by module (``fedmetanas_core.run.config``); this package re-exports nothing.
"""
