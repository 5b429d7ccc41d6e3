"""The client side of the run's differential privacy (the ``dp`` key), as one ClientApp mod.

Flower's mods are fixed when the ClientApp is built, while the DP mode is a run-config key: this mod
reads the run's config and picks ``fixedclipping_mod`` / ``adaptiveclipping_mod`` (the server's DP
wrapper sends the clipping norm) or ``LocalDpMod``; nothing for the other modes. The server side is
``server_app.privacy``; the accounting is ``fedmetanas_core.threats.privacy``.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod

from fedmetanas_core.federation.client_round import run_config
from fedmetanas_core.threats.privacy import local_reply_epsilon
from flower_records import select

Handler = Callable[[Message, Context], Message]


def dp_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """The run's client-side DP mod around ``call_next``. Flower's mods pair the reply's arrays with
    the sent ones by position: the reply is put in the sent key order first."""
    cfg = run_config(context.run_id, context.run_config)
    if cfg.dp == "client-fixed":
        mod = fixedclipping_mod
    elif cfg.dp == "client-adaptive":
        mod = adaptiveclipping_mod
    elif cfg.dp == "local":
        z, delta = cfg.dp_noise_multiplier, cfg.dp_delta
        mod = LocalDpMod(cfg.dp_clipping_norm, cfg.dp_clipping_norm, local_reply_epsilon(z, delta), delta)
    else:
        return call_next(msg, context)
    sent = list(msg.content["arrays"].keys()) if "arrays" in msg.content.array_records else []

    def in_sent_order(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if not reply.has_error() and "arrays" in reply.content.array_records:
            if set(reply.content["arrays"].keys()) == set(sent):
                reply.content["arrays"] = select(reply.content["arrays"], sent)
        return reply

    return mod(msg, context, in_sent_order)
