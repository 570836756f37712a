"""The permission table covers every RPC; policy matching is exact; XFCC parsing is strict."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import shared.proto.raven.training.v1 as protos
from shared.auth import policy, spiffe
from shared.auth.authenticate import Unauthenticated, parse_xfcc
from shared.auth.permissions import OPEN_SERVICES, RULES, Level, level
from shared.auth.tls import TransportConfigError, is_loopback, server_tls
from shared.settings import Settings


def _methods() -> dict[str, object]:
    """Every RPC of every service in our protos: `/pkg.Service/Method` -> its descriptor."""
    found: dict[str, object] = {}
    for module in pkgutil.iter_modules(protos.__path__):
        if not module.name.endswith("_pb2"):
            continue
        descriptor = importlib.import_module(f"{protos.__name__}.{module.name}").DESCRIPTOR
        for service in descriptor.services_by_name.values():
            for method in service.methods:
                found[f"/{service.full_name}/{method.name}"] = method
    return found


def test_every_rpc_has_a_permission():
    methods = _methods()
    assert "/raven.training.v1.AuditService/ListAuditRecords" in methods
    missing = sorted(m for m in methods if m not in RULES)
    assert not missing, f"RPCs without an entry in shared/auth/permissions.py RULES: {missing}"
    unknown = sorted(m for m in RULES if m not in methods)
    assert not unknown, f"RULES names RPCs that do not exist: {unknown}"
    assert not {m.lstrip("/").split("/")[0] for m in methods} & OPEN_SERVICES


def test_state_changing_rpcs_do_not_stream_responses():
    # The admission audits a change when the handler returns: a streamed response would
    # be recorded before it finished.
    methods = _methods()
    for name, rule in RULES.items():
        if rule.mutates:
            assert not methods[name].server_streaming, name  # type: ignore[attr-defined]


def test_permissions_match_whole_names_only():
    rule = RULES["/raven.training.v1.TrainingRunService/GetTrainingRun"]
    assert level(frozenset({"training_runs.read"}), rule) is Level.ALL
    assert level(frozenset({"training_runs.read.own"}), rule) is Level.OWN
    for near in ("training_runs", "training_runs.rea", "training_runs.read ", "admi", "*"):
        assert level(frozenset({near}), rule) is None
    create = RULES["/raven.training.v1.TrainingRunService/CreateTrainingRun"]
    assert level(frozenset({"training_runs.create.own"}), create) is None
    assert level(frozenset({"admin"}), create) is Level.ALL


def test_unknown_permission_names_reject_the_policy():
    with pytest.raises(policy.PolicyError):
        policy.parse({"grant": [{"spiffe_id": "spiffe://td/a", "permissions": ["training_runs"]}]})
    with pytest.raises(policy.PolicyError):
        policy.parse({"grant": [{"spiffe_id": "spiffe://td/a", "claim": "x", "permissions": []}]})


def test_spiffe_prefixes_match_whole_segments():
    parsed = policy.parse(
        {"grant": [{"spiffe_prefix": "spiffe://td/ns/ml/", "permissions": ["admin"]}]}
    )
    assert parsed.for_workload("spiffe://td/ns/ml/sa/x") == {"admin"}
    assert parsed.for_workload("spiffe://td/ns/ml") == {"admin"}
    assert parsed.for_workload("spiffe://td/ns/ml-x/sa/x") == frozenset()
    assert parsed.for_workload("spiffe://other/ns/ml/sa/x") == frozenset()
    assert parsed.for_workload("spiffe://td/ns/ml/../admin") == frozenset()


def test_claims_match_exact_values_or_list_members():
    parsed = policy.parse(
        {"grant": [{"claim": "groups", "value": "ml", "permissions": ["trained_models.read"]}]}
    )
    assert parsed.for_claims({"groups": ["ops", "ml"]}) == {"trained_models.read"}
    assert parsed.for_claims({"groups": "ml"}) == {"trained_models.read"}
    assert parsed.for_claims({"groups": "ml-admins"}) == frozenset()
    assert parsed.for_claims({"groups": ["mlx"]}) == frozenset()


def test_spiffe_ids_are_parsed_strictly():
    assert str(spiffe.parse("spiffe://td/ns/a/sa/b")) == "spiffe://td/ns/a/sa/b"
    for bad in (
        "https://td/a",
        "spiffe://TD/a",
        "spiffe://td/a//b",
        "spiffe://td/a?x",
        "spiffe://td",
    ):
        with pytest.raises(spiffe.InvalidSpiffeId):
            spiffe.parse(bad)


def test_xfcc_parsing():
    assert parse_xfcc('By=spiffe://td/p;Hash=ab;URI="spiffe://td/a";DNS=x') == [
        [("By", "spiffe://td/p"), ("Hash", "ab"), ("URI", "spiffe://td/a"), ("DNS", "x")]
    ]
    assert parse_xfcc('Subject="CN=a,O=b";URI=spiffe://td/a') == [
        [("Subject", "CN=a,O=b"), ("URI", "spiffe://td/a")]
    ]
    assert len(parse_xfcc("URI=spiffe://td/a,URI=spiffe://td/b")) == 2
    with pytest.raises(Unauthenticated):
        parse_xfcc('URI="spiffe://td/a')


def test_plaintext_only_on_loopback():
    assert is_loopback("127.0.0.1:50051") and is_loopback("[::1]:0") and is_loopback("localhost:1")
    assert not is_loopback("0.0.0.0:50051") and not is_loopback("[::]:1")
    assert not is_loopback("10.0.0.5:1") and not is_loopback("raven:50051")


def test_development_plaintext_is_refused_off_loopback():
    settings = Settings(insecure_dev=True)
    assert server_tls(settings, "127.0.0.1:0") is None
    with pytest.raises(TransportConfigError):
        server_tls(settings, "0.0.0.0:50051")
    with pytest.raises(TransportConfigError, match="RAVEN_TLS"):
        server_tls(Settings(), "127.0.0.1:0")
