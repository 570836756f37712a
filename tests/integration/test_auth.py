"""Authentication and authorization over real mTLS on loopback, with certificates and
tokens made by the test (tests/pki.py). Every refusal is checked for its exact status
code, for telling the caller nothing, and for leaving the domain tables as they were."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Sequence

import grpc
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.trained_models.main import TrainedModelsApp
from services.training_runs.main import TrainingRunsApp
from shared.auth.audit import UNAUTHENTICATED_IDENTITY
from shared.db.engine import create_engine
from shared.messaging import Subjects
from shared.proto.raven.training.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    training_run_pb2,
    training_run_pb2_grpc,
)
from shared.settings import Settings
from tests import pki as test_pki
from tests.pki import ADMIN, PROXY, Pki, sa
from tests.support import create_request, eventually

READER = sa("reader")
NOBODY = sa("nobody")
PORTAL = sa("portal")  # a service acting for end users
OWN = sa("own-reader")
CREATE = "/raven.training.v1.TrainingRunService/CreateTrainingRun"
LIST = "/raven.training.v1.TrainingRunService/ListTrainingRuns"

GRANTS: list[tuple[str, Sequence[str]]] = [
    *test_pki.BASE_GRANTS,
    (READER, ["training_runs.read", "trained_models.read"]),
    (PORTAL, ["training_runs.read", "training_runs.create"]),
    (OWN, ["training_runs.read.own", "training_runs.create"]),
]
USER_GRANTS = """
[[grant]]
claim = "roles"
value = "run-creator"
permissions = ["training_runs.read", "training_runs.create"]

[[grant]]
claim = "roles"
value = "viewer"
permissions = ["training_runs.read"]
"""


@pytest.fixture(scope="module", autouse=True)
def policy(pki: Pki) -> object:
    pki.write_policy(GRANTS, USER_GRANTS)
    yield
    pki.write_policy(test_pki.BASE_GRANTS)


@pytest.fixture(scope="module")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database_url)
    yield engine
    await engine.dispose()


async def domain_state(engine: AsyncEngine) -> tuple[object, ...]:
    """Everything a call could change outside the audit trail."""
    async with engine.connect() as connection:
        runs = (
            await connection.execute(text("SELECT id, version FROM training_runs ORDER BY id"))
        ).all()
        events = (await connection.execute(text("SELECT count(*) FROM training_run_events"))).one()
        models = (
            await connection.execute(text("SELECT id, version FROM trained_models ORDER BY id"))
        ).all()
    return (tuple(runs), tuple(events), tuple(models))


async def audit_rows(engine: AsyncEngine, after_id: int) -> list[dict[str, object]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT * FROM audit_records WHERE id > :id ORDER BY id"), {"id": after_id}
        )
        return [dict(r) for r in rows.mappings()]


async def last_audit_id(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int(
            (
                await connection.execute(text("SELECT coalesce(max(id), 0) FROM audit_records"))
            ).scalar_one()
        )


class Refusal:
    """Runs one call as a given client and checks the refusal and what it left behind."""

    def __init__(
        self, engine: AsyncEngine, training_runs: TrainingRunsApp, pki: Pki, dataset_uri: str
    ) -> None:
        self.engine = engine
        self.port = training_runs.port
        self.pki = pki
        self.dataset_uri = dataset_uri

    async def create(
        self, channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]] = ()
    ) -> training_run_pb2.TrainingRun:
        stub = training_run_pb2_grpc.TrainingRunServiceStub(channel)
        return await stub.CreateTrainingRun(
            create_request(self.dataset_uri), metadata=tuple(metadata), timeout=10
        )

    async def expect(
        self,
        code: grpc.StatusCode,
        channel: grpc.aio.Channel,
        metadata: Sequence[tuple[str, str]] = (),
        *,
        audited_as: str | None = None,
    ) -> list[dict[str, object]]:
        before, last = await domain_state(self.engine), await last_audit_id(self.engine)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await self.create(channel, metadata)
        assert raised.value.code() == code, raised.value.details()
        assert await domain_state(self.engine) == before, "a refused call changed the database"
        records = await audit_rows(self.engine, last)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # Constant texts: nothing about which permission, which identity, what exists.
            assert raised.value.details() in ("authentication required", "permission denied")
            assert [r["outcome"] for r in records] == [code.name]
            assert records[0]["rpc"] == CREATE
            if audited_as is not None:
                assert records[0]["identity"] == audited_as
        else:
            assert records == [], "the handshake refused it: no call reached the server"
        return records


@pytest.fixture
def refusal(engine, training_runs, pki, dataset_uri) -> Refusal:
    return Refusal(engine, training_runs, pki, dataset_uri)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


# --- Transport: the TLS handshake refuses these before any RPC exists -------------------------
# A server that requires client certificates ends the handshake, so the client sees
# UNAVAILABLE (the connection never carried a call), not a status of a call.


async def test_no_client_certificate_is_refused_by_the_handshake(refusal, pki, training_runs):
    channel = pki.channel(training_runs.port, client_cert=False)
    await refusal.expect(grpc.StatusCode.UNAVAILABLE, channel)


async def test_a_certificate_from_another_ca_is_refused_by_the_handshake(
    refusal, pki, training_runs
):
    channel = pki.channel(training_runs.port, ADMIN, other_ca=True)
    await refusal.expect(grpc.StatusCode.UNAVAILABLE, channel)


async def test_an_expired_certificate_is_refused_by_the_handshake(refusal, pki, training_runs):
    channel = pki.channel(training_runs.port, ADMIN, expired=True)
    await refusal.expect(grpc.StatusCode.UNAVAILABLE, channel)


async def test_plaintext_is_refused(refusal, training_runs):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{training_runs.port}")
    await refusal.expect(grpc.StatusCode.UNAVAILABLE, channel)


# --- Identity --------------------------------------------------------------------------------


async def test_a_certificate_with_two_uri_sans_is_unauthenticated(refusal, pki, training_runs):
    channel = pki.channel(training_runs.port, ADMIN, READER)
    await refusal.expect(
        grpc.StatusCode.UNAUTHENTICATED, channel, audited_as=UNAUTHENTICATED_IDENTITY
    )


async def test_a_certificate_without_a_spiffe_id_is_unauthenticated(refusal, pki, training_runs):
    channel = pki.channel(training_runs.port, "https://raven.example/admin")
    await refusal.expect(grpc.StatusCode.UNAUTHENTICATED, channel)


async def test_a_valid_identity_without_the_permission_is_denied(refusal, pki, training_runs):
    channel = pki.channel(training_runs.port, READER)
    records = await refusal.expect(grpc.StatusCode.PERMISSION_DENIED, channel, audited_as=READER)
    assert records[0]["detail"] == "workload lacks training_runs.create"


async def test_a_forged_forwarded_certificate_from_an_untrusted_peer_is_ignored(
    refusal, pki, training_runs
):
    # The reader claims, by header, to be forwarding the admin: it stays the reader.
    channel = pki.channel(training_runs.port, READER)
    await refusal.expect(
        grpc.StatusCode.PERMISSION_DENIED,
        channel,
        [("x-forwarded-client-cert", f"By={PROXY};URI={ADMIN}")],
        audited_as=READER,
    )


async def test_the_trusted_proxy_forwards_the_client_identity(refusal, pki, training_runs, engine):
    before = await domain_state(engine)
    async with pki.channel(training_runs.port, PROXY) as channel:
        stub = training_run_pb2_grpc.TrainingRunServiceStub(channel)
        # Forwarding the reader: the reader's permissions apply, not the proxy's (none).
        header = [("x-forwarded-client-cert", f'By={PROXY};Hash=abc;URI="{READER}"')]
        listed = await stub.ListTrainingRuns(
            training_run_pb2.ListTrainingRunsRequest(page_size=1), metadata=header, timeout=10
        )
        assert listed is not None
        assert await domain_state(engine) == before
        # Without the header the proxy is itself, and holds nothing.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ListTrainingRuns(training_run_pb2.ListTrainingRunsRequest(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The forwarded reader may not create, though the header came from the trusted proxy.
    records = await refusal.expect(
        grpc.StatusCode.PERMISSION_DENIED,
        pki.channel(training_runs.port, PROXY),
        header,
        audited_as=READER,
    )
    assert records[0]["proxy"] == PROXY
    # Two hops (elements) is not one client: refused, not guessed.
    await refusal.expect(
        grpc.StatusCode.UNAUTHENTICATED,
        pki.channel(training_runs.port, PROXY),
        [("x-forwarded-client-cert", f"URI={ADMIN},URI={READER}")],
    )


async def test_the_trusted_proxy_records_the_forwarded_identity_as_creator(
    refusal, pki, training_runs
):
    async with pki.channel(training_runs.port, PROXY) as channel:
        run = await refusal.create(channel, [("x-forwarded-client-cert", f"URI={PORTAL}")])
    assert run.creator == PORTAL


# --- End-user tokens -------------------------------------------------------------------------


async def test_a_token_with_a_bad_signature_is_unauthenticated(refusal, pki, training_runs):
    forged = pki.token(roles="run-creator", key=test_pki.rsa.generate_private_key(65537, 2048))
    await refusal.expect(
        grpc.StatusCode.UNAUTHENTICATED,
        pki.channel(training_runs.port, PORTAL),
        bearer(forged),
        audited_as=PORTAL,
    )


async def test_an_expired_token_is_unauthenticated(refusal, pki, training_runs):
    expired = pki.token(roles="run-creator", lifetime_s=-3600)
    await refusal.expect(
        grpc.StatusCode.UNAUTHENTICATED, pki.channel(training_runs.port, PORTAL), bearer(expired)
    )


async def test_a_token_not_valid_yet_is_unauthenticated(refusal, pki, training_runs):
    early = pki.token(roles="run-creator", not_before_s=3600, lifetime_s=7200)
    await refusal.expect(
        grpc.StatusCode.UNAUTHENTICATED, pki.channel(training_runs.port, PORTAL), bearer(early)
    )


def _unsigned(header: dict[str, str], payload: dict[str, object]) -> str:
    def part(value: dict[str, object] | dict[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part(header)}.{part(payload)}."


async def test_an_alg_none_token_is_unauthenticated(refusal, pki, training_runs):
    claims = json.loads(
        base64.urlsafe_b64decode(pki.token(roles="run-creator").split(".")[1] + "==")
    )
    token = _unsigned({"alg": "none", "typ": "JWT"}, claims)
    await refusal.expect(
        grpc.StatusCode.UNAUTHENTICATED, pki.channel(training_runs.port, PORTAL), bearer(token)
    )


async def test_an_hmac_token_keyed_with_the_public_key_is_unauthenticated(
    refusal, pki, training_runs
):
    # The algorithm-confusion attack: HS256 with the issuer's public key as the secret.
    claims = json.loads(
        base64.urlsafe_b64decode(pki.token(roles="run-creator").split(".")[1] + "==")
    )
    unsigned = _unsigned({"alg": "HS256", "typ": "JWT"}, claims).rstrip(".")
    secret = pki.jwt_key_files[0].read_bytes()
    signature = hmac.new(secret, unsigned.encode(), hashlib.sha256).digest()
    token = unsigned + "." + base64.urlsafe_b64encode(signature).decode().rstrip("=")
    await refusal.expect(
        grpc.StatusCode.UNAUTHENTICATED, pki.channel(training_runs.port, PORTAL), bearer(token)
    )


async def test_a_token_for_another_audience_is_unauthenticated(refusal, pki, training_runs):
    token = pki.token(roles="run-creator", audience="another-service")
    await refusal.expect(
        grpc.StatusCode.UNAUTHENTICATED, pki.channel(training_runs.port, PORTAL), bearer(token)
    )


async def test_a_token_from_another_issuer_is_unauthenticated(refusal, pki, training_runs):
    token = pki.token(roles="run-creator", issuer="https://elsewhere")
    await refusal.expect(
        grpc.StatusCode.UNAUTHENTICATED, pki.channel(training_runs.port, PORTAL), bearer(token)
    )


async def test_a_service_acting_for_a_user_needs_both_permissions(refusal, pki, training_runs):
    # The user may only view: the portal's own create permission is not enough.
    viewer = pki.token("bob", roles="viewer")
    records = await refusal.expect(
        grpc.StatusCode.PERMISSION_DENIED,
        pki.channel(training_runs.port, PORTAL),
        bearer(viewer),
        audited_as=PORTAL,
    )
    assert records[0]["on_behalf_of"] == "user:bob"
    assert records[0]["detail"] == "user lacks training_runs.create"
    # The user may create, the reader service may not.
    creator = pki.token("carol", roles="run-creator")
    await refusal.expect(
        grpc.StatusCode.PERMISSION_DENIED, pki.channel(training_runs.port, READER), bearer(creator)
    )
    # Both may: the run is the user's (ES256 this time).
    async with pki.channel(training_runs.port, PORTAL) as channel:
        run = await refusal.create(
            channel, bearer(pki.token("carol", algorithm="ES256", roles=["run-creator"]))
        )
    assert run.creator == "user:carol"


# --- Policy ----------------------------------------------------------------------------------


async def test_the_policy_is_reloaded_without_restart(refusal, pki, training_runs, engine):
    async def list_as_nobody() -> grpc.StatusCode:
        async with pki.channel(training_runs.port, NOBODY) as channel:
            stub = training_run_pb2_grpc.TrainingRunServiceStub(channel)
            try:
                await stub.ListTrainingRuns(training_run_pb2.ListTrainingRunsRequest(), timeout=10)
            except grpc.aio.AioRpcError as error:
                return error.code()
        return grpc.StatusCode.OK

    before = await domain_state(engine)
    assert await list_as_nobody() == grpc.StatusCode.PERMISSION_DENIED
    pki.write_policy([*GRANTS, (NOBODY, ["training_runs.read"])], USER_GRANTS)
    assert await list_as_nobody() == grpc.StatusCode.OK
    # A broken edit keeps the last good policy.
    pki.policy_file.write_text("[[grant]]\nspiffe_id = 42\n")
    assert await list_as_nobody() == grpc.StatusCode.OK
    pki.write_policy(GRANTS, USER_GRANTS)
    assert await list_as_nobody() == grpc.StatusCode.PERMISSION_DENIED
    # Reading is not creating, even for a freshly granted reader.
    await refusal.expect(grpc.StatusCode.PERMISSION_DENIED, pki.channel(training_runs.port, NOBODY))
    assert await domain_state(engine) == before


async def test_a_spiffe_prefix_grants_whole_segments_only(refusal, pki, training_runs):
    pki.write_policy(
        GRANTS,
        '[[grant]]\nspiffe_prefix = "spiffe://test.raven/ns/batch"\n'
        'permissions = ["training_runs.create"]\n',
    )
    try:
        async with pki.channel(training_runs.port, sa("nightly", "batch")) as channel:
            await refusal.create(channel)
        await refusal.expect(
            grpc.StatusCode.PERMISSION_DENIED,
            pki.channel(training_runs.port, sa("nightly", "batch-jobs")),
        )
    finally:
        pki.write_policy(GRANTS, USER_GRANTS)


# --- Ownership scoping -----------------------------------------------------------------------


async def test_read_own_sees_only_the_callers_runs(refusal, pki, training_runs, runs):
    theirs = await runs.CreateTrainingRun(create_request(refusal.dataset_uri))
    async with pki.channel(training_runs.port, OWN) as channel:
        mine = await refusal.create(channel)
        stub = training_run_pb2_grpc.TrainingRunServiceStub(channel)
        listed = await stub.ListTrainingRuns(
            training_run_pb2.ListTrainingRunsRequest(page_size=1000), timeout=10
        )
        assert {r.creator for r in listed.training_runs} == {OWN}
        assert mine.name in {r.name for r in listed.training_runs}
        # Asking for someone else's runs returns nothing rather than widening the scope.
        other = await stub.ListTrainingRuns(
            training_run_pb2.ListTrainingRunsRequest(creator=ADMIN), timeout=10
        )
        assert list(other.training_runs) == []
        assert (
            await stub.GetTrainingRun(
                training_run_pb2.GetTrainingRunRequest(name=mine.name), timeout=10
            )
        ).name == mine.name
        # Another's run reads as missing: the same answer as a name that does not exist.
        for call, request in (
            (stub.GetTrainingRun, training_run_pb2.GetTrainingRunRequest(name=theirs.name)),
            (
                stub.ListTrainingRunEvents,
                training_run_pb2.ListTrainingRunEventsRequest(name=theirs.name),
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(request, timeout=10)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stub.WatchTrainingRun(
                training_run_pb2.WatchTrainingRunRequest(name=theirs.name), timeout=10
            ):
                pass
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


# --- Open services and the audit trail --------------------------------------------------------


async def test_health_is_open_to_any_verified_peer(pki, training_runs, trained_models):
    for port in (training_runs.port, trained_models.port):
        async with pki.channel(port, NOBODY) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_audit_records_are_queryable_by_admins_and_published(
    refusal,
    pki,
    training_runs: TrainingRunsApp,
    trained_models: TrainedModelsApp,
    nc: nats.NATS,
    subjects: Subjects,
):
    received: asyncio.Queue[audit_pb2.AuditRecord] = asyncio.Queue()

    async def on_message(msg: nats.aio.msg.Msg) -> None:
        await received.put(audit_pb2.AuditRecord.FromString(msg.data))

    subscription = await nc.subscribe(subjects.audit_recorded, cb=on_message)
    try:
        await refusal.expect(
            grpc.StatusCode.PERMISSION_DENIED, pki.channel(training_runs.port, NOBODY)
        )
        async with pki.channel(training_runs.port, ADMIN) as channel:
            created = await refusal.create(channel)
        event = await asyncio.wait_for(received.get(), 10)
        assert (event.identity, event.outcome, event.rpc) == (NOBODY, "PERMISSION_DENIED", CREATE)
        event = await asyncio.wait_for(received.get(), 10)
        assert (event.identity, event.outcome, event.resource) == (ADMIN, "OK", created.name)
    finally:
        await subscription.unsubscribe()

    # Both servers serve the trail; only admins may read it.
    for port in (training_runs.port, trained_models.port):
        async with pki.channel(port, ADMIN) as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            page = await stub.ListAuditRecords(
                audit_pb2.ListAuditRecordsRequest(identity=NOBODY, page_size=1), timeout=10
            )
            assert page.audit_records[0].outcome == "PERMISSION_DENIED"
            assert page.next_page_token or len(page.audit_records) == 1
            mine = await stub.ListAuditRecords(
                audit_pb2.ListAuditRecordsRequest(resource=created.name), timeout=10
            )
            assert [(r.rpc, r.outcome) for r in mine.audit_records] == [(CREATE, "OK")]
        async with pki.channel(port, READER) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await audit_pb2_grpc.AuditServiceStub(channel).ListAuditRecords(
                    audit_pb2.ListAuditRecordsRequest(), timeout=10
                )
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_failed_state_changes_are_audited_with_their_status(runs, engine):
    last = await last_audit_id(engine)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await runs.CancelTrainingRun(
            training_run_pb2.CancelTrainingRunRequest(
                name="trainingRuns/00000000-0000-0000-0000-000000000000"
            )
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    # abort() sends the status before the handler's task ends: the record follows it.
    [record] = await eventually(lambda: audit_rows(engine, last))
    assert (record["outcome"], record["identity"], record["resource"]) == (
        "NOT_FOUND",
        ADMIN,
        "trainingRuns/00000000-0000-0000-0000-000000000000",
    )
