"""FedMetaNAS as a Flower-free PyTorch library: the apps, the harness and the benchmarks call it.

Each subpackage is one concern, listed bottom up: a package imports those before it in this
list. The exceptions, each deliberate: ``run.outputs`` writes the method's genotype
and network, ``threats.attacks`` names ``RunConfig`` for type checking only, and a few imports
inside functions (``method.budget`` reads a ``deployment.latency`` table and the run's space from
``federation.coordinator``).

- ``names``: the shared vocabulary (op names, cell types, edge keys, parameter prefixes), torch-free;
- ``util``: helpers that know nothing of NAS (atomic writes, an LRU cache, processes, seeds);
- ``threats``: differential privacy and attacks, the checks behind their run-config keys;
- ``run``: the run-config key table and ``RunConfig``, a node's config, and the run's output files;
- ``space``: the DARTS search space, its continuous relaxation and its cost counting;
- ``data``: datasets, federated partitions, minibatch streams;
- ``method``: local search and training, aggregation, the genotype, the cost budget, what is sent;
- ``federation``: the round protocol as plain values (server phases and schedules, a client's round);
- ``deployment``: export to a device, ``fedmetanas-predict``, measured latency;
- ``report``: figures and Markdown reports rebuilt from a run's files.
"""
