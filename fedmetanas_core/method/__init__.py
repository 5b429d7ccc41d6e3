"""The method: the maths FedMetaNAS (and its baselines) run on tensors and state dicts.

One concern: what is computed, independent of who computes it or when. Local search and training
on one client, the server's aggregation of client states, the discrete architecture derived from
the logits, the cost budget that shapes the search, and which weights a client can still run.
The round protocol that calls these (``federation``) and the Flower apps sit above; the search
space (``space``) and the data (``data``) below.

- ``maml``: functional MAML over network weights and architecture logits;
- ``training``: local work for each method (FedMetaNAS, FedNAS, FedAvg) and evaluation;
- ``aggregation``: server-side maths on client states (screening, averaging logits, permanent masks);
- ``genotype``: the discrete architecture (derivation, serialisation, the derived network);
- ``budget``: a run's cost budget (the cost term, the width it sizes, the best cell within it);
- ``transfer``: what goes over the wire, only the weights a client can still run.

Imported by module (``fedmetanas_core.method.training``); this package re-exports nothing.
"""
