"""Governed publication: the gate a model passes to be published, channels, and the
history of who published what, when and why."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import structlog

from services.trained_models import artifacts, incumbent
from services.trained_models.domain import (
    Origin,
    PublicationAction,
    PublicationEvent,
    TrainedModel,
)
from services.trained_models.evaluation_reads import EvaluationReads
from services.trained_models.handlers import Clock, check_etag, get_model, utcnow
from services.trained_models.unit_of_work import UnitOfWork
from shared import limits
from shared.errors import FailedPrecondition, NotFound, Violations
from shared.storage import Storage

log = structlog.get_logger(__name__)

CHANNEL = re.compile(r"[a-z][a-z0-9-]{0,62}")
MAX_REASON = limits.REASON_MAX


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishCommand:
    model_id: uuid.UUID
    channel: str
    reason: str
    actor: str
    etag: str = ""
    min_bbox_map: float | None = None
    evaluation_split: str = ""
    evaluation_epoch: int | None = None
    # None: the server's policy decides whether to compare with the channel's model.
    beat_incumbent: bool | None = None
    incumbent_metric: str = ""
    incumbent_tolerance: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PublicationPolicy:
    """What the server requires of every publication, whatever the request says, and
    where it verifies the model's files."""

    storage: Storage
    default_channel: str
    min_bbox_map: float | None = None
    incumbent_policy: incumbent.IncumbentPolicy = field(default_factory=incumbent.IncumbentPolicy)


def _validate(command: PublishCommand) -> None:
    violations = Violations()
    violations.check(
        bool(CHANNEL.fullmatch(command.channel)),
        "channel",
        "lower-case letters, digits and '-', starting with a letter, at most 63",
    )
    violations.check(
        len(command.reason) <= MAX_REASON, "reason", f"at most {MAX_REASON} characters"
    )
    if command.min_bbox_map is not None:
        violations.check(0.0 <= command.min_bbox_map <= 1.0, "min_bbox_map", "between 0 and 1")
    violations.check(
        command.evaluation_split in ("", "val", "test"), "evaluation_split", "'val' or 'test'"
    )
    incumbent.validate(
        violations, metric=command.incumbent_metric, tolerance=command.incumbent_tolerance
    )
    violations.raise_if_any()


async def _check_origin(uow: UnitOfWork, model: TrainedModel) -> None:
    if model.origin is Origin.IMPORT:
        return
    if model.training_run_id is None:
        # Registered from a run that succeeded and was deleted since: registration
        # checked the success, and the model keeps its own artifacts.
        return
    async with uow:
        state = await uow.models.run_state(model.training_run_id)
    if state is not None and state != "SUCCEEDED":
        raise FailedPrecondition(
            f"trained model {model.id} comes from trainingRuns/{model.training_run_id}, "
            f"which is {state}, not SUCCEEDED"
        )


def _check_evaluation(
    model: TrainedModel, command: PublishCommand, policy: PublicationPolicy
) -> None:
    thresholds = [t for t in (command.min_bbox_map, policy.min_bbox_map) if t is not None]
    model.ensure_publishable(
        evaluation_split=command.evaluation_split,
        evaluation_epoch=command.evaluation_epoch,
        min_bbox_map=max(thresholds) if thresholds else None,
    )


async def _precheck_incumbent(
    uow: UnitOfWork, model: TrainedModel, command: PublishCommand, policy: PublicationPolicy
) -> None:
    """The comparison with the channel's model as it is now, before the model's files
    are hashed: a candidate that falls short is told so in milliseconds, not after
    reading gigabytes. The comparison that counts is made again under the channel's lock."""
    rule = _rule(command, policy)
    if rule is None:
        return
    async with uow.reading():
        reads = EvaluationReads(uow.session)
        incumbent_id = await reads.published_in(command.channel)
        if incumbent_id is None or incumbent_id == model.id:
            return
        records = await reads.succeeded([model.id, incumbent_id])
    incumbent.compare(model.id, incumbent_id, records, rule)


def _rule(command: PublishCommand, policy: PublicationPolicy) -> incumbent.IncumbentRule | None:
    return incumbent.rule_for(
        policy.incumbent_policy,
        beat_incumbent=command.beat_incumbent,
        metric=command.incumbent_metric,
        tolerance=command.incumbent_tolerance,
    )


async def _compare_with(
    uow: UnitOfWork,
    model: TrainedModel,
    replaced: TrainedModel | None,
    command: PublishCommand,
    policy: PublicationPolicy,
) -> incumbent.Comparison | None:
    """The comparison with the channel's model that this publication needs, or None
    when it needs none (not asked for, not required, or an empty channel)."""
    rule = _rule(command, policy)
    if rule is None or replaced is None:
        return None
    records = await EvaluationReads(uow.session).succeeded([model.id, replaced.id])
    return incumbent.compare(model.id, replaced.id, records, rule)


async def publish(
    uow: UnitOfWork, command: PublishCommand, policy: PublicationPolicy, *, clock: Clock = utcnow
) -> TrainedModel:
    """Puts the model in its channel, replacing the model published there, in one
    transaction; the gate is passed first."""
    if not command.channel:
        command = replace(command, channel=policy.default_channel)
    _validate(command)
    model = await get_model(uow, command.model_id)
    check_etag(model, command.etag)
    await _check_origin(uow, model)
    _check_evaluation(model, command, policy)
    await _precheck_incumbent(uow, model, command, policy)
    # Files are re-read outside the transaction: hashing a checkpoint takes seconds and
    # artifacts never change in place, so holding locks across it would buy nothing.
    await artifacts.verify_all(model.artifacts, policy.storage)

    async with uow:
        # Publications to one channel queue here: two concurrent ones end as one
        # replacing the other, both recorded, never two models in the channel.
        await uow.models.lock_channel(command.channel)
        locked = await uow.models.get(command.model_id, for_update=True)
        if locked is None:
            raise NotFound(f"trained model {command.model_id} was deleted")
        model = locked
        check_etag(model, command.etag)
        now = clock()
        if not model.publish(channel=command.channel, actor=command.actor, now=now):
            return model
        replaced = await uow.models.published_in(command.channel)
        # Read under the channel's lock: the comparison is with the model this
        # publication replaces, not one that was there a moment ago.
        comparison = await _compare_with(uow, model, replaced, command, policy)
        if replaced is not None:
            replaced.unpublish(now=now)
            await uow.publications.add(
                PublicationEvent(
                    trained_model_id=replaced.id,
                    action=PublicationAction.UNPUBLISHED,
                    channel=command.channel,
                    actor=command.actor,
                    reason=f"replaced by trainedModels/{model.id}",
                    time=now,
                    bbox_map=replaced.bbox_map,
                )
            )
        event_id = await uow.publications.add(
            PublicationEvent(
                trained_model_id=model.id,
                action=PublicationAction.PUBLISHED,
                channel=command.channel,
                actor=command.actor,
                reason=command.reason,
                time=now,
                replaced_model_id=replaced.id if replaced else None,
                bbox_map=model.bbox_map,
                incumbent_comparison=comparison.to_json() if comparison else None,
            )
        )
        await uow.commit()
    log.info(
        "trained model published",
        model_id=str(model.id),
        channel=command.channel,
        replaced=str(replaced.id) if replaced else None,
        event_id=event_id,
        compared=comparison.incumbent_evaluation if comparison else None,
    )
    return model


async def unpublish(
    uow: UnitOfWork,
    model_id: uuid.UUID,
    *,
    reason: str,
    actor: str,
    etag: str = "",
    clock: Clock = utcnow,
) -> TrainedModel:
    violations = Violations()
    violations.check(len(reason) <= MAX_REASON, "reason", f"at most {MAX_REASON} characters")
    violations.raise_if_any()
    current = await get_model(uow, model_id)
    async with uow:
        # The same lock order as publish: channel, then rows.
        if current.channel:
            await uow.models.lock_channel(current.channel)
        model = await uow.models.get(model_id, for_update=True)
        if model is None:
            raise NotFound(f"trained model {model_id} was deleted")
        check_etag(model, etag)
        now = clock()
        channel = model.unpublish(now=now)
        await uow.publications.add(
            PublicationEvent(
                trained_model_id=model.id,
                action=PublicationAction.UNPUBLISHED,
                channel=channel,
                actor=actor,
                reason=reason,
                time=now,
                bbox_map=model.bbox_map,
            )
        )
        await uow.commit()
    return model


async def history(
    uow: UnitOfWork,
    *,
    model_id: uuid.UUID | None,
    channel: str,
    limit: int,
    before_id: int | None,
    creator: str | None = None,
) -> Sequence[PublicationEvent]:
    """Newest first; `creator`: of that identity's models only."""
    async with uow:
        return await uow.publications.list(
            model_id=model_id, channel=channel, limit=limit, before_id=before_id, creator=creator
        )
