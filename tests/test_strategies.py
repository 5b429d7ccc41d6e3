"""Any Flower strategy aggregates for every method; swapping it changes nothing else.

Real ClientApp replies (the client's local search on digits) go through `SearchStrategy` wrapping
FedAvg, FedAdam, FedProx, FedMedian and Krum, for FedMetaNAS, FedNAS (search and retraining) and
FedAvg. The round config the clients see is the same for every strategy, FedProx only adding
its `proximal-mu`; a user's own class plugs in by import path.
"""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from helpers import NodeIds

from client_app.app import evaluate, train
from fedmetanas_core.data import load_dataset
from fedmetanas_core.federation.coordinator import model_config, space_for_run
from fedmetanas_core.federation.phases import Handoff, plan_phases
from fedmetanas_core.run.config import RunConfig
from flower_records import array_record
from server_app.strategy import SearchStrategy, build_base_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity")

STRATEGIES = ("FedAvg", "FedAdam", "FedProx", "FedMedian", "Krum")
TINY = {
    "local-meta-iters": 1,
    "local-epochs": 1,
    "min-available-nodes": 4,
    "min-train-nodes": 2,
    "batch-size": 16,
    "init-channels": 4,
    "num-partitions": 4,
    "train-subset": 400,
}


RUN_IDS = {"fedmetanas": 1, "fednas": 2, "fednas-retrain": 3, "fedavg": 4}  # the client caches its config per run


def _phase(cfg: RunConfig, method: str):
    """The method's first phase (FedNAS retraining: its second, started from the fresh search's genotype)."""
    _, test = load_dataset("digits")
    space = space_for_run(cfg, test)
    phases = plan_phases(cfg.replace(num_server_rounds=2, retrain_rounds=2), space, test, torch.device("cpu"))
    phases[0].start(Handoff())
    if method == "fednas-retrain":
        phases[1].start(Handoff(phases[0].genotype))
        return phases[1], space
    return phases[0], space


@pytest.mark.parametrize("method", ["fedmetanas", "fednas", "fednas-retrain", "fedavg"])
def test_every_strategy_aggregates_real_client_replies(method):
    flat = {**TINY, "method": method.split("-")[0]}
    cfg = RunConfig.from_flat(flat)
    phase, space = _phase(cfg, method)
    arrays = array_record(phase.initial_state())
    round_config = {"method": cfg.method, **model_config(space), **phase.round_config(2)}
    replies_cache = {}
    for name in STRATEGIES:
        strategy = SearchStrategy(
            build_base_strategy(cfg.replace(strategy=name, proximal_mu=0.1)), cfg.alpha_aggregation, 2
        )
        grid = NodeIds([11, 12, 13, 14])
        messages = list(strategy.configure_train(2, arrays, ConfigRecord(dict(round_config)), grid))
        assert len(messages) == 4
        sent = dict(messages[0].content["config"])
        extra = set(sent) - set(round_config) - {"server-round"}
        assert extra == ({"proximal-mu"} if name == "FedProx" else set()), name
        assert all(sent[k] == v for k, v in round_config.items()), name  # tau, masks, phase: unchanged

        replies = []
        for pid, msg in enumerate(messages):
            key = (pid, sent.get("proximal-mu", 0.0))
            if key not in replies_cache:
                ctx = Context(
                    run_id=RUN_IDS[method],
                    node_id=msg.metadata.dst_node_id,
                    node_config={"partition-id": pid, "num-partitions": 4},
                    state=RecordDict(),
                    run_config=dict(RunConfig.from_flat(flat)),
                )
                content = train(msg, ctx).content
                replies_cache[key] = ({k: v.numpy() for k, v in content["arrays"].items()}, content["metrics"])
            state, metrics = replies_cache[key]  # fresh records: FedMedian pops arrays out of replies
            replies.append(Message(RecordDict({"arrays": array_record(state), "metrics": metrics}), reply_to=msg))
        aggregated, _ = strategy.aggregate_train(2, replies)
        assert aggregated is not None, name
        new = {k: v.numpy() for k, v in aggregated.items()}
        old = {k: v.numpy() for k, v in arrays.items()}
        assert set(new) == set(old) and all(np.all(np.isfinite(v)) for v in new.values()), name
        assert any(not np.allclose(new[k], old[k]) for k in new), name
        phase.accept(2, new)  # the coordinator takes any strategy's aggregate


def test_fedprox_proximal_term_pulls_towards_global_weights():
    cfg = RunConfig.from_flat({**TINY, "method": "fedavg", "outer-lr-w": 0.5})
    phase, space = _phase(cfg, "fedavg")
    arrays = array_record(phase.initial_state())
    base = {"method": "fedavg", **model_config(space), **phase.round_config(1)}
    drift = {}
    for mu in (0.0, 50.0):
        strategy = SearchStrategy(build_base_strategy(cfg.replace(strategy="FedProx", proximal_mu=mu)))
        msg = list(strategy.configure_train(1, arrays, ConfigRecord(dict(base)), NodeIds([11, 12, 13, 14])))[0]
        ctx = Context(
            run_id=100 + int(mu),
            node_id=11,
            node_config={"partition-id": 0, "num-partitions": 4},
            state=RecordDict(),
            run_config=dict(cfg),
        )
        state = train(msg, ctx).content["arrays"].to_torch_state_dict()
        drift[mu] = sum(float((state[k] - torch.from_numpy(v.numpy())).norm()) for k, v in arrays.items())
    assert drift[50.0] < 0.5 * drift[0.0]


class CountingFedAvg:  # defined in a test module: plugged in by import path
    pass


def test_user_strategy_by_import_path():
    cfg = RunConfig.from_flat({"strategy": "flwr.serverapp.strategy:FedTrimmedAvg", "trim-beta": 0.1})
    assert type(build_base_strategy(cfg)).__name__ == "FedTrimmedAvg"
    with pytest.raises(TypeError, match="not a flwr.serverapp.strategy.Strategy"):
        build_base_strategy(cfg.replace(strategy="tests.test_strategies:CountingFedAvg"))


def test_client_evaluate_personalizes_the_deployed_network_at_its_own_step_size():
    cfg = RunConfig.from_flat({**TINY, "personalize-steps": 3})
    phase, space = _phase(cfg, "fedmetanas")
    derived = phase.derived_network()
    arrays = ArrayRecord({k: v.detach().cpu() for k, v in derived.state_dict().items()})
    config = ConfigRecord(
        {
            "method": "fedmetanas",
            **model_config(space),
            "phase": "fixed",
            "genotype": phase.genotype.to_json(),
            "personalize": True,
        }
    )
    ctx = Context(
        run_id=7,
        node_id=11,
        node_config={"partition-id": 1, "num-partitions": 4},
        state=RecordDict(),
        run_config=dict(cfg),
    )

    def personalize(run_config, run_id=7):  # the client caches a run's config by run id
        msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=11, message_type="evaluate")
        c = Context(
            run_id=run_id, node_id=11, node_config=ctx.node_config, state=RecordDict(), run_config=dict(run_config)
        )
        return evaluate(msg, c).content["metrics"]

    metrics = personalize(cfg)
    assert metrics["partition-id"] == 1 and metrics["num-examples"] > 0
    assert 0.0 <= metrics["accuracy-before"] <= 1.0 and 0.0 <= metrics["accuracy-after"] <= 1.0
    assert metrics["accuracy-after"] != metrics["accuracy-before"]  # K adaptation steps changed the model
    # the method's own task-learner step no longer leaks into the protocol; personalize-lr does
    assert personalize(cfg.replace(inner_lr_w=0.5), run_id=8) == metrics
    assert personalize(cfg.replace(personalize_lr=0.0001), run_id=9)["accuracy-after"] != metrics["accuracy-after"]
    search_config = ConfigRecord(
        {"method": "fedmetanas", **model_config(space), **phase.round_config(2), "personalize": True}
    )
    search_msg = Message(
        RecordDict({"arrays": array_record(phase.initial_state()), "config": search_config}),
        dst_node_id=11,
        message_type="evaluate",
    )
    with pytest.raises(ValueError, match="deployed"):
        evaluate(search_msg, ctx)
