"""Small helpers that know nothing of NAS, federated learning or Flower.

One concern: plumbing every layer may use (the data cache, the reports, the run's files, the
harness and the tests), kept apart so that the other packages read as the method.

- ``atomic``: atomic file writes (temporary file, then rename), torch-free;
- ``lru``: a bounded least-recently-used cache for long-lived processes;
- ``processes``: processes by PID, read from /proc (stop exactly what was started, never by name);
- ``seeding``: seeds derived per (run seed, stream, node, round).

Imported by module (``fedmetanas_core.util.atomic``); this package re-exports nothing.
"""
