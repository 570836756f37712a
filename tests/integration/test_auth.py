"""Authentication and authorization over real mTLS on loopback, with certificates and
tokens made by the test (tests/pki.py). Every refusal is checked for its exact status
code, for telling the caller nothing, and for leaving the domain tables as they were."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
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
    trained_model_pb2,
    trained_model_pb2_grpc,
    training_run_pb2,
    training_run_pb2_grpc,
    worker_pb2,
)
from shared.settings import Settings
from tests import pki as test_pki
from tests.pki import ADMIN, PROXY, Pki, sa
from tests.support import WorkerDriver, create_request, eventually

READER = sa("reader")
NOBODY = sa("nobody")
PORTAL = sa("portal")  # a service acting for end users
OWN = sa("own-reader")
# May read only its own runs and models, and do everything else to them.
OWN_OPERATOR = sa("own-operator")
CREATE = "/raven.training.v1.TrainingRunService/CreateTrainingRun"
LIST = "/raven.training.v1.TrainingRunService/ListTrainingRuns"

GRANTS: list[tuple[str, Sequence[str]]] = [
    *test_pki.BASE_GRANTS,
    (READER, ["training_runs.read", "trained_models.read"]),
    (PORTAL, ["training_runs.read", "training_runs.create"]),
    (OWN, ["training_runs.read.own", "training_runs.create"]),
    (
        OWN_OPERATOR,
        [
            "training_runs.read.own",
            "training_runs.create",
            "training_runs.update",
            "training_runs.cancel",
            "training_runs.delete",
            "training_runs.metrics.read",
            "trained_models.read.own",
            "trained_models.update",
            "trained_models.publish",
            "trained_models.download",
            "trained_models.delete",
        ],
    ),
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


UPDATE = "/raven.training.v1.TrainingRunService/UpdateTrainingRun"


def rename(name: str, display_name: str) -> training_run_pb2.UpdateTrainingRunRequest:
    return training_run_pb2.UpdateTrainingRunRequest(
        training_run=training_run_pb2.TrainingRun(name=name, display_name=display_name),
        update_mask={"paths": ["display_name"]},
    )


async def _same_transaction(engine: AsyncEngine, name: str, rpc: str) -> bool:
    """Whether the run's row was last written where the call's OK record was: rows one
    (sub)transaction wrote carry its id in xmin."""
    async with engine.connect() as connection:
        return bool(
            (
                await connection.execute(
                    text(
                        "SELECT (SELECT xmin::text FROM training_runs WHERE id = :id)"
                        " = (SELECT xmin::text FROM audit_records"
                        "    WHERE resource = :name AND rpc = :rpc AND outcome = 'OK')"
                    ),
                    {"id": name.removeprefix("trainingRuns/"), "name": name, "rpc": rpc},
                )
            ).scalar_one()
        )


async def test_a_change_is_committed_with_its_audit_record(runs, engine, dataset_uri):
    created = await runs.CreateTrainingRun(create_request(dataset_uri))
    # Written before the response: no waiting.
    records = await audit_rows(engine, 0)
    assert [r["outcome"] for r in records if r["resource"] == created.name] == ["OK"]
    assert await _same_transaction(engine, created.name, CREATE)
    await runs.UpdateTrainingRun(rename(created.name, "renamed"))
    assert await _same_transaction(engine, created.name, UPDATE)


@pytest.fixture
async def refusing_trigger(engine: AsyncEngine) -> AsyncIterator[None]:
    """Makes Postgres refuse any run renamed to "refused" and any OK record of a rename
    to "unaudited": a commit that fails, whichever of its rows fails it."""
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "CREATE FUNCTION refuse_write() RETURNS trigger AS $$ BEGIN"
                " RAISE EXCEPTION 'refused by a test trigger'; END $$ LANGUAGE plpgsql"
            )
        )
        await connection.execute(
            text(
                "CREATE TRIGGER refuse_rename BEFORE UPDATE ON training_runs FOR EACH ROW"
                " WHEN (NEW.display_name = 'refused') EXECUTE FUNCTION refuse_write()"
            )
        )
        await connection.execute(
            text(
                "CREATE FUNCTION refuse_audit() RETURNS trigger AS $$ BEGIN"
                " IF EXISTS (SELECT 1 FROM training_runs WHERE display_name = 'unaudited') THEN"
                " RAISE EXCEPTION 'refused by a test trigger'; END IF; RETURN NEW;"
                " END $$ LANGUAGE plpgsql"
            )
        )
        await connection.execute(
            text(
                "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_records FOR EACH ROW"
                " WHEN (NEW.outcome = 'OK' AND NEW.rpc LIKE '%UpdateTrainingRun')"
                " EXECUTE FUNCTION refuse_audit()"
            )
        )
    yield
    async with engine.begin() as connection:
        await connection.execute(text("DROP TRIGGER refuse_rename ON training_runs"))
        await connection.execute(text("DROP TRIGGER refuse_audit ON audit_records"))
        await connection.execute(text("DROP FUNCTION refuse_write()"))
        await connection.execute(text("DROP FUNCTION refuse_audit()"))


@pytest.mark.parametrize("display_name", ["refused", "unaudited"])
async def test_a_change_whose_commit_fails_has_no_record_of_success(
    runs, engine, dataset_uri, refusing_trigger, display_name
):
    created = await runs.CreateTrainingRun(create_request(dataset_uri))
    last = await last_audit_id(engine)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await runs.UpdateTrainingRun(rename(created.name, display_name))
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    current = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=created.name))
    assert current.display_name == created.display_name and current.etag == created.etag
    [record] = await eventually(lambda: audit_rows(engine, last))
    assert (record["rpc"], record["outcome"], record["resource"]) == (
        UPDATE,
        "INTERNAL",
        created.name,
    )


# --- Ownership in every call that names a resource --------------------------------------------

MISSING_RUN = "trainingRuns/00000000-0000-4000-8000-000000000000"
MISSING_MODEL = "trainedModels/00000000-0000-4000-8000-000000000000"


async def _insert_model(engine: AsyncEngine, creator: str, base: str | None = None) -> str:
    model_id = uuid.uuid4()
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO trained_models (id, display_name, architecture, classes, artifacts,"
                " creator, base_model_id) VALUES (:id, 'owned', 'retinanet_r18_fpn',"
                " '[\"dump\"]', '[]', :creator, :base)"
            ),
            {
                "id": model_id,
                "creator": creator,
                "base": uuid.UUID(base.split("/")[1]) if base else None,
            },
        )
    return f"trainedModels/{model_id}"


async def _refusal_of(call: object, request: object) -> tuple[grpc.StatusCode, str]:
    try:
        result = call(request, timeout=10)  # type: ignore[operator]
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def test_every_call_naming_anothers_resource_reads_it_as_missing(
    pki, training_runs, trained_models, runs, engine, dataset_uri
):
    theirs = await runs.CreateTrainingRun(create_request(dataset_uri))
    their_model = await _insert_model(engine, ADMIN)
    # Mine, fine-tuned from theirs; then theirs from mine, and mine from that.
    my_model = await _insert_model(engine, OWN_OPERATOR, base=their_model)
    their_child = await _insert_model(engine, ADMIN, base=my_model)
    my_child = await _insert_model(engine, OWN_OPERATOR, base=my_model)
    await _insert_model(engine, OWN_OPERATOR, base=their_child)
    rpb, mpb = training_run_pb2, trained_model_pb2
    run_calls = {
        "GetTrainingRun": lambda n: rpb.GetTrainingRunRequest(name=n),
        "UpdateTrainingRun": lambda n: rpb.UpdateTrainingRunRequest(
            training_run=rpb.TrainingRun(name=n, display_name="mine now"),
            update_mask={"paths": ["display_name"]},
        ),
        "CancelTrainingRun": lambda n: rpb.CancelTrainingRunRequest(name=n),
        "DeleteTrainingRun": lambda n: rpb.DeleteTrainingRunRequest(name=n),
        "RetryTrainingRun": lambda n: rpb.RetryTrainingRunRequest(name=n),
        "ListTrainingRunEvents": lambda n: rpb.ListTrainingRunEventsRequest(name=n),
        "GetTrainingRunMetrics": lambda n: rpb.GetTrainingRunMetricsRequest(name=n),
        "WatchTrainingRun": lambda n: rpb.WatchTrainingRunRequest(name=n),
    }
    model_calls = {
        "GetTrainedModel": lambda n: mpb.GetTrainedModelRequest(name=n),
        "UpdateTrainedModel": lambda n: mpb.UpdateTrainedModelRequest(
            trained_model=mpb.TrainedModel(name=n, display_name="mine now"),
            update_mask={"paths": ["display_name"]},
        ),
        "PublishTrainedModel": lambda n: mpb.PublishTrainedModelRequest(name=n, channel="prod"),
        "UnpublishTrainedModel": lambda n: mpb.UnpublishTrainedModelRequest(name=n),
        "GetTrainedModelLineage": lambda n: mpb.GetTrainedModelLineageRequest(name=n),
        "ListPublicationEvents": lambda n: mpb.ListPublicationEventsRequest(trained_model=n),
        "DownloadTrainedModel": lambda n: mpb.DownloadTrainedModelRequest(name=n),
        "DeleteTrainedModel": lambda n: mpb.DeleteTrainedModelRequest(name=n),
    }
    before = await domain_state(engine)
    async with (
        pki.channel(training_runs.port, OWN_OPERATOR) as runs_channel,
        pki.channel(trained_models.port, OWN_OPERATOR) as models_channel,
    ):
        run_stub = training_run_pb2_grpc.TrainingRunServiceStub(runs_channel)
        model_stub = trained_model_pb2_grpc.TrainedModelServiceStub(models_channel)
        for stub, calls, existing, absent in (
            (run_stub, run_calls, theirs.name, MISSING_RUN),
            (model_stub, model_calls, their_model, MISSING_MODEL),
        ):
            for rpc, request in calls.items():
                code, details = await _refusal_of(getattr(stub, rpc), request(existing))
                missing_code, missing_details = await _refusal_of(
                    getattr(stub, rpc), request(absent)
                )
                assert code == grpc.StatusCode.NOT_FOUND, (rpc, code, details)
                # Word for word the answer for a name that does not exist.
                assert (code, details.replace(existing.split("/")[1], "ID")) == (
                    missing_code,
                    missing_details.replace(absent.split("/")[1], "ID"),
                ), rpc
        assert await domain_state(engine) == before, "a call on another's resource changed it"

        # Its own model it sees; fine-tuning from another's model reads it as missing.
        got = await model_stub.GetTrainedModel(mpb.GetTrainedModelRequest(name=my_model))
        assert got.name == my_model
        # Its lineage shows its own models only, reached through its own models.
        lineage = await model_stub.GetTrainedModelLineage(
            mpb.GetTrainedModelLineageRequest(name=my_model)
        )
        assert [n.trained_model for n in lineage.ancestors] == [my_model]
        assert [n.trained_model for n in lineage.descendants] == [my_child]
        assert their_child not in {n.trained_model for n in lineage.descendants}
        listed = await model_stub.ListTrainedModels(mpb.ListTrainedModelsRequest(page_size=1000))
        assert {m.creator for m in listed.trained_models} == {OWN_OPERATOR}
        other = await model_stub.ListTrainedModels(mpb.ListTrainedModelsRequest(creator=ADMIN))
        assert list(other.trained_models) == []
        fine_tune = create_request(dataset_uri)
        fine_tune.training_run.base_model = their_model
        code, details = await _refusal_of(run_stub.CreateTrainingRun, fine_tune)
        fine_tune.training_run.base_model = MISSING_MODEL
        fine_tune.request_id = str(uuid.uuid4())
        _, missing_details = await _refusal_of(run_stub.CreateTrainingRun, fine_tune)
        assert code == grpc.StatusCode.NOT_FOUND
        assert details.replace(their_model, "M") == missing_details.replace(MISSING_MODEL, "M")
    assert await domain_state(engine) == before


async def test_retry_of_anothers_run_creates_nothing(pki, training_runs, runs, engine, dataset_uri):
    theirs = await runs.CreateTrainingRun(create_request(dataset_uri))
    await runs.CancelTrainingRun(training_run_pb2.CancelTrainingRunRequest(name=theirs.name))
    before = await domain_state(engine)
    async with pki.channel(training_runs.port, OWN) as channel:
        stub = training_run_pb2_grpc.TrainingRunServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.RetryTrainingRun(
                training_run_pb2.RetryTrainingRunRequest(name=theirs.name), timeout=10
            )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert await domain_state(engine) == before


# --- Hostile input cannot block the event pipeline or escape the audit ------------------------


async def test_a_refused_call_with_a_nul_in_its_name_is_audited(pki, training_runs, engine):
    last = await last_audit_id(engine)
    async with pki.channel(training_runs.port, NOBODY) as channel:
        stub = training_run_pb2_grpc.TrainingRunServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.DeleteTrainingRun(
                training_run_pb2.DeleteTrainingRunRequest(name="trainingRuns/\x00evil"), timeout=10
            )
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED

    async def records_of_this_call() -> list[dict[str, object]]:
        # A record of an earlier test's call may commit after `last` was read: only this
        # caller's deletes are this call's.
        rows = await audit_rows(engine, last)
        return [
            r
            for r in rows
            if r["identity"] == NOBODY and str(r["rpc"]).endswith("/DeleteTrainingRun")
        ]

    [record] = await eventually(records_of_this_call)
    assert (record["identity"], record["outcome"]) == (NOBODY, "PERMISSION_DENIED")
    assert record["resource"] == "trainingRuns/\ufffdevil"


async def test_huge_refused_names_leave_the_event_pipeline_flowing(
    pki, training_runs, runs, engine, nc: nats.NATS, subjects: Subjects, dataset_uri
):
    js = nc.jetstream()
    received: dict[str, list[bytes]] = {"jobs": [], "events": [], "audit": []}

    def collect(kind: str):  # type: ignore[no-untyped-def]
        async def on_message(msg: nats.aio.msg.Msg) -> None:
            received[kind].append(msg.data)

        return on_message

    subscriptions = [
        await nc.subscribe(subjects.jobs, cb=collect("jobs")),
        await nc.subscribe(subjects.run_events, cb=collect("events")),
        await nc.subscribe(subjects.audit_recorded, cb=collect("audit")),
    ]
    try:
        last = await last_audit_id(engine)
        huge = "trainingRuns/" + "a" * (1024 * 1024)
        async with pki.channel(training_runs.port, NOBODY) as channel:
            stub = training_run_pb2_grpc.TrainingRunServiceStub(channel)
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.DeleteTrainingRun(
                        training_run_pb2.DeleteTrainingRunRequest(name=huge), timeout=10
                    )
                assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert raised.value.details() == "permission denied"
        records = await eventually(lambda: _at_least(audit_rows(engine, last), 3), timeout=10)
        assert all(r["outcome"] == "PERMISSION_DENIED" for r in records)
        assert all(len(str(r["resource"])) <= 256 for r in records)
        assert all(str(r["resource"]).startswith("trainingRuns/aaa") for r in records)

        # A valid run afterwards: its job and its events go out promptly.
        started = time.monotonic()
        run = await runs.CreateTrainingRun(create_request(dataset_uri))
        run_id = run.name.split("/")[1]

        def job_sent() -> bool:
            return any(
                worker_pb2.TrainingJob.FromString(d).training_run == run.name
                for d in received["jobs"]
            )

        await eventually(_now(job_sent), timeout=10)
        worker = WorkerDriver(js, subjects, run)
        await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())

        def preparing_published() -> bool:
            events = [training_run_pb2.TrainingRunEvent.FromString(d) for d in received["events"]]
            return any(
                e.training_run == run.name
                and e.state_changed.to_state == training_run_pb2.TrainingRun.PREPARING
                for e in events
            )

        await eventually(_now(preparing_published), timeout=10)
        elapsed = time.monotonic() - started
        assert elapsed < 10, f"the run's events took {elapsed:.1f} s"
        # The refusals' own audit events were small enough to publish too.
        audited = [audit_pb2.AuditRecord.FromString(d) for d in received["audit"]]
        refused = [a for a in audited if a.identity == NOBODY and a.resource.startswith(huge[:20])]
        assert len(refused) >= 3 and all(len(a.resource) <= 256 for a in refused)
        assert run_id
    finally:
        for subscription in subscriptions:
            await subscription.unsubscribe()


async def _at_least(rows, count: int):  # type: ignore[no-untyped-def]
    found = await rows
    return found if len(found) >= count else None


def _now(predicate):  # type: ignore[no-untyped-def]
    async def probe() -> bool:
        return bool(predicate())

    return probe
