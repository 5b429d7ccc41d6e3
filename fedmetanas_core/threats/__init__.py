"""Threats a federation must withstand, and the defences: privacy and attacks.

One concern: what could be learnt about a client's data from what it shares, and what malicious
clients could do to the federation's architecture; both Flower-free (the mechanisms that wrap
Flower are ``server_app.privacy`` and ``client_app.privacy``).

- ``privacy``: differential privacy, which configs can work and the privacy spent (RDP accountant);
- ``attacks``: attack injection for simulations, and the robust aggregation of architecture logits.

Below the run config, which validates their keys. Imported by module
(``fedmetanas_core.threats.privacy``); this package re-exports nothing.
"""
