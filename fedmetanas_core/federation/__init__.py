"""The federation: who does what in a round, Flower-free.

One concern: the protocol between the server and its clients, as plain values. The Flower apps
only translate records to and from what these modules take and return, so the same code runs
under a simulation, a deployment and the in-process harness.

- ``coordinator``: the server's round protocol and schedules (the round plan as config values,
  the learning-rate schedule, seeded initialisation, the run's space);
- ``phases``: a run as a list of phases (the ``Phase`` protocol, search / retrain / fixed network,
  the planner);
- ``client_round``: a client's round, between decoding the server's message and replying.

Imported by module (``fedmetanas_core.federation.phases``); this package re-exports nothing.
"""
