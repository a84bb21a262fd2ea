"""Client-level DP: the accountant against dp_accounting, and the server stage against hand-computed sums.

Every figure here comes from an independent computation: epsilon from Google's dp_accounting (RDP and PLD,
not Opacus), clipping from one flattened vector's norm, the released mean from the clipped deltas summed by
hand, the noise's scale from its empirical spread over many coordinates.
"""

from __future__ import annotations

import math
import warnings

import dp_accounting as dpa
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from flwr.app import ConfigRecord, Message, RecordDict

from fed.adapters import Aggregation, Structure
from fed.config import ConfigError, DPConfig, FederationConfig, RunConfig
from fed.privacy.book import LedgerBook
from fed.privacy.client_level import (
    ClientAccount,
    ClientMechanism,
    client_epsilon,
    dense_mean_problems,
)
from fed.reports.privacy import cross_checked
from fed.wire import from_record, metas
from strategies.client_dp import ClientLevelDP
from strategies.core import AdapterStrategy, ServerUpdate
from strategies.pipeline import AdapterModel, Reply, RoundLog, RoundState, Stage
from tests.helpers import make, reply_from

pytestmark = pytest.mark.usefixtures("flower_identity")


def reference_epsilon(z: float, q: float, rounds: int, delta: float, accountant: str) -> float:
    """dp_accounting's epsilon of ``rounds`` Poisson-sampled Gaussian releases (RDP, or PLD for PRV)."""
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    acc = RdpAccountant() if accountant == "rdp" else PLDAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(delta))


CASES = [(1.0, 1.0, 3), (1.5, 0.25, 20), (2.0, 0.05, 500)]


@pytest.mark.parametrize("z, q, rounds", CASES)
def test_client_epsilon_matches_dp_accounting_under_both_accountants(z, q, rounds):
    warnings.filterwarnings("ignore")
    for accountant, tolerance in (("rdp", 0.01), ("prv", 0.02)):  # Opacus's RDP order grid and PRV domain differ
        expected = reference_epsilon(z, q, rounds, 1e-5, accountant)
        assert client_epsilon(z, q, rounds, 1e-5, accountant) == pytest.approx(expected, tolerance)


def test_the_update_and_the_clip_count_together_are_the_accounted_gaussian():
    """z_u and z_b composed (dp_accounting, no sampling) spend what one Gaussian of multiplier z does."""
    mech = ClientMechanism(1.2, 1.0, 10, 0.1, adaptive=True, count_noise_multiplier=3.0)
    joint = RdpAccountant()
    joint.compose(dpa.ComposedDpEvent([dpa.GaussianDpEvent(mech.update_noise_multiplier), dpa.GaussianDpEvent(3.0)]))
    single = RdpAccountant()
    single.compose(dpa.GaussianDpEvent(1.2))
    assert joint.get_epsilon(1e-5) == pytest.approx(single.get_epsilon(1e-5), rel=1e-6)
    assert mech.update_noise_multiplier > 1.2 and mech.count_std == 1.5


def test_the_report_recomputes_the_client_level_epsilon_from_its_rounds():
    dp = DPConfig(enabled=True, level="client", client_noise_multiplier=1.5)
    account = ClientAccount.of(dp, FederationConfig(num_clients=40, fraction_train=0.25))
    for r in range(1, 21):
        account.book(r)
    report = {**LedgerBook(dp, client=account).report(), "client_level": {**account.report(), "epsilon": 0.0}}
    level = cross_checked(report)["client_level"]  # a tampered figure is recomputed, not trusted
    assert level["epsilon_rdp"] == pytest.approx(reference_epsilon(1.5, 0.25, 20, 1e-5, "rdp"), 0.01)
    assert level["epsilon_prv"] == pytest.approx(reference_epsilon(1.5, 0.25, 20, 1e-5, "prv"), 0.02)
    assert level["epsilon_by_round"][-1]["epsilon"] == level["epsilon"]
    assert level["trust"].startswith("the server") and level["unit"] == "client"


def test_a_cap_stops_the_run_before_the_round_that_would_pass_it():
    dp = DPConfig(enabled=True, level="client", client_noise_multiplier=1.0, client_target_epsilon=8.0)
    stage = ClientLevelDP(ClientAccount.of(dp, FederationConfig(num_clients=4, fraction_train=1.0)))
    allowed = max(t for t in range(1, 20) if reference_epsilon(1.0, 1.0, t, 1e-5, "rdp") <= 8.0)
    sent = []
    for r in range(1, allowed + 3):
        out = stage.outgoing(_messages(4, r))
        sent.append(len(out))
        if out:
            stage.account.book(r)
    assert sent == [4] * allowed + [0, 0]
    assert stage.account.stopped == allowed + 1 and stage.account.epsilon() <= 8.0
    assert len(stage.account.flags) == 1 and "client_target_epsilon=8" in stage.account.flags[0]


def test_poisson_sampling_keeps_each_node_independently_at_the_rate():
    dp = DPConfig(enabled=True, level="client")
    stage = ClientLevelDP(ClientAccount.of(dp, FederationConfig(num_clients=4000, fraction_train=0.3)))
    first, second = ({m.metadata.dst_node_id for m in stage.outgoing(_messages(4000, 1))} for _ in range(2))
    sd = math.sqrt(4000 * 0.3 * 0.7)
    assert abs(len(first) - 1200) < 4 * sd and abs(len(second) - 1200) < 4 * sd
    assert abs(len(first & second) - 4000 * 0.09) < 4 * math.sqrt(4000 * 0.09 * 0.91)  # independent draws


def _messages(count: int, run_round: int) -> list[Message]:
    config = ConfigRecord({"server-round": run_round})
    return [Message(RecordDict({"config": config}), dst_node_id=i + 1, message_type="train") for i in range(count)]


def test_clipping_bounds_all_sent_tensors_jointly():
    dp = DPConfig(enabled=True, level="client", client_clip=0.5)
    stage = ClientLevelDP(ClientAccount.of(dp, FederationConfig(num_clients=4, fraction_train=1.0)))
    state = RoundState(number=1, log=RoundLog(), global_={}, budgets={})
    g = torch.Generator().manual_seed(0)
    delta = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    flat = torch.cat([t.flatten() for t in delta.values()])
    small = {n: t * 1e-3 for n, t in delta.items()}
    replies = [Reply(_messages(1, 1)[0], weight=50.0, delta=d) for d in (delta, small)]
    for reply in replies:
        stage.accepted(state, reply)
    out = torch.cat([replies[0].delta[n].flatten() for n in delta])
    assert float(out.norm()) == pytest.approx(0.5, rel=1e-5)
    torch.testing.assert_close(out / out.norm(), flat / flat.norm())  # direction kept
    torch.testing.assert_close(replies[1].delta["a"], delta["a"] * 1e-3)  # within the bound: unchanged
    assert [r.weight for r in replies] == [1.0, 1.0] and state.log.clipped == 1


WIDE = {"w": torch.zeros(100, 200)}
WIDE_MODEL = AdapterModel(metas(WIDE), Structure({"w": Aggregation.MEAN}))


class Decode(Stage):
    def arrive(self, state: RoundState, reply: Reply) -> None:
        reply.delta = from_record(reply.message.content.array_records["arrays"], WIDE_MODEL.expected)
        reply.weight = float(reply.metrics["num-examples"])


def test_the_release_is_the_clipped_sum_over_the_expected_clients_plus_noise_of_std_z_c():
    """Three replies of unequal claimed sizes and norms: the global moves by server_lr x (sum of the clipped
    deltas, weights ignored) / (q N), plus noise whose spread over 20,000 coordinates is z C / (q N)."""
    dp = DPConfig(enabled=True, level="client", client_noise_multiplier=0.7, client_clip=2.0)
    account = ClientAccount.of(dp, FederationConfig(num_clients=8, fraction_train=0.5))
    strategy = AdapterStrategy(
        model=WIDE_MODEL, stages=[ClientLevelDP(account), Decode()], update=ServerUpdate(server_lr=0.5)
    )
    strategy._global = {"w": torch.zeros(100, 200)}
    g = torch.Generator().manual_seed(1)
    deltas = [{"w": torch.randn(100, 200, generator=g) * s} for s in (0.001, 0.05, 1.0)]
    replies = [reply_from(n + 1, d, {"num-examples": c}) for n, (d, c) in enumerate(zip(deltas, (5, 500, 50_000)))]
    arrays, summary = strategy.aggregate_train(1, replies)
    by_hand = sum(d["w"] * min(1.0, 2.0 / float(d["w"].norm())) for d in deltas)
    residual = from_record(arrays, WIDE_MODEL.expected)["w"] - 0.5 * by_hand / 4.0
    expected_std = 0.5 * 0.7 * 2.0 / 4.0
    assert float(residual.mean()).__abs__() < 4 * expected_std / math.sqrt(residual.numel())
    assert float(residual.std()) == pytest.approx(expected_std, rel=0.03)
    assert summary["clipped"] == 2 and [r.round for r in account.rounds] == [1]


def test_adaptive_clipping_steps_towards_the_target_quantile_from_a_noised_count():
    mech = ClientMechanism(1.0, 0.5, 40, 1.0, adaptive=True, clip_lr=0.2, count_noise_multiplier=4.0)
    steps = torch.tensor([math.log(mech.next_clip(1.0, within=15, sampled=20)) for _ in range(4000)])
    fraction = (15 - 10) / 20 + 0.5  # the centred count read against q N = 20
    assert float(steps.mean()) == pytest.approx(-0.2 * (fraction - 0.5), abs=4 * 0.2 * 2.0 / 20 / math.sqrt(4000))
    assert float(steps.std()) == pytest.approx(0.2 * 2.0 / 20, rel=0.05)  # sigma_b = z_b / 2 = 2


@pytest.mark.parametrize("row", ["lora", "ffa-lora", "moslora", "mole", "mor", "roselora", "dynamic-lora"])
def test_families_whose_aggregation_is_not_a_weighted_mean_are_refused_by_name(row):
    problems = dense_mean_problems(make(row).structure().kinds)
    if row in ("lora", "ffa-lora"):
        assert problems == []
    else:
        kind = {"moslora": "product", "mole": "usage", "mor": "usage", "roselora": "masked"}.get(row, "allocation")
        assert len(problems) == 1 and kind in problems[0] and "weighted mean" in problems[0]


def test_the_config_refuses_robust_rules_and_product_averaging_at_the_client_level():
    for key, value in (("strategy.rule", "median"), ("strategy.aggregation", "product")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            RunConfig.from_flat({"dp.enabled": True, "dp.level": "client", key: value})
    with pytest.raises(ConfigError, match="client_count_noise_multiplier"):
        RunConfig.from_flat(
            {
                "dp.enabled": True,
                "dp.level": "client",
                "dp.client_clipping": "adaptive",
                "dp.client_count_noise_multiplier": 0.5,
            }
        )
    client_only = RunConfig.from_flat({"dp.enabled": True, "dp.level": "client"})  # no DP-SGD settings needed
    assert client_only.dp.client_level and not client_only.dp.example_level


def test_fed_plan_plans_both_levels_with_the_client_level_cap(capsys):
    from simulations.cli import main

    argv = ["plan", "--set", "model.name=tiny-bert", "--set", "federation.num_clients=10"]
    argv += ["--set", "federation.rounds=6", "--set", "federation.fraction_train=0.5", "--examples", "800"]
    for setting in ("dp.enabled=true", "dp.level=both", "dp.noise_multiplier=1", "dp.client_target_epsilon=4"):
        argv += ["--set", setting]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines at the test console's width
    assert "client-level epsilon per round" in out and "epsilon per round at delta" in out
    last = max(t for t in range(1, 7) if reference_epsilon(1.0, 0.5, t, 1e-5, "rdp") <= 4)
    assert f"stops the run after round {last} of 6" in out


def test_a_family_that_is_not_a_dense_mean_stops_the_run_before_any_worker():
    from fed.session import server_preflight

    cfg = RunConfig.from_flat(
        {"model.name": "tiny-bert", "adapter.kind": "roselora", "dp.enabled": True, "dp.level": "client"}
    )
    with pytest.raises(ConfigError, match="masked"):
        server_preflight(cfg)
