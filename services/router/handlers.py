"""Router handlers: decode -> one transaction -> domain -> repo -> outbox."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    model_validator,
)

from schemas import topics
from schemas.events import (
    EngagementReceived,
    LeadData,
    LeadReceived,
    LeadRouted,
    LeadSnapshot,
    LeadUpdateRequested,
    SequenceChanged,
    TenantId,
)
from services.router import domain, repo
from services.runtime.consumer import Rejection
from services.runtime.outbox import enqueue

#: Most leads one ``POST /leads`` may carry.
MAX_BATCH = 1000
#: Most routing rules one tenant may have in one ``PUT /routing-rules``.
MAX_RULES = 1000
#: The inbox consumer name of lead intake, over the topic and over HTTP alike: an
#: event posted and also published is applied once.
INTAKE_CONSUMER = "router"


class InvalidItems(ValueError):
    """Some items of a request are invalid; nothing was written."""

    def __init__(self, errors: list[tuple[int, str]]) -> None:
        super().__init__("; ".join(f"item {i}: {e}" for i, e in errors))
        self.errors = errors

    def detail(self) -> list[dict[str, Any]]:
        return [{"index": index, "error": error} for index, error in self.errors]


# ------------------------------------------------------------------ HTTP request bodies


def _refuse_unknown_fields(value: Any, allowed: tuple[str, ...], what: str) -> Any:
    if isinstance(value, dict):
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(unknown)}; {what} takes {', '.join(allowed)}"
            )
    return value


class LeadIntake(BaseModel):
    """``POST /leads`` with one lead (also an item of a batch): the JSON of the
    ``leads`` topic, envelope fields included."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lead: LeadData
    sequence: str | None = Field(default=None, max_length=100)
    tenant_id: TenantId | None = None
    #: The envelope, as on the topic. ``event_id`` makes the request idempotent: an
    #: event applied already (over HTTP or from the topic) changes nothing.
    event_type: Literal["LeadReceived"] | None = None
    event_id: uuid.UUID | None = None
    occurred_at: AwareDatetime | None = None
    schema_version: Literal[1] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, value: Any) -> Any:
        return _refuse_unknown_fields(value, tuple(cls.model_fields), "a lead intake")


class LeadIntakeBatch(BaseModel):
    """``POST /leads`` with many leads: all are applied, or none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    leads: list[LeadIntake] = Field(min_length=1, max_length=MAX_BATCH)
    tenant_id: TenantId | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, value: Any) -> Any:
        return _refuse_unknown_fields(value, tuple(cls.model_fields), "a batch")


def _intake_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return "batch" if "leads" in value else "single"
    if isinstance(value, LeadIntakeBatch):
        return "batch"
    if isinstance(value, LeadIntake):
        return "single"
    return None


IntakeBody = Annotated[
    Annotated[LeadIntake, Tag("single")] | Annotated[LeadIntakeBatch, Tag("batch")],
    Discriminator(
        _intake_kind,
        custom_error_type="invalid_intake_body",
        custom_error_message='the body must be an object with "lead" (one lead)'
        ' or "leads" (a batch)',
    ),
]


class RoutingRuleIn(BaseModel):
    """A routing rule as ``PUT``/``POST /routing-rules`` take it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``PUT`` only: keep this existing rule's id (a list read with ``GET`` can be
    #: edited and put back); without it the rule gets a new id.
    id: uuid.UUID | None = None
    name: str
    match: dict[str, Any] = Field(default_factory=dict)
    sequence: str
    enabled: StrictBool = True
    #: Accepted and ignored, so that ``GET`` output can be put back: the order of the
    #: list is the order of the rules.
    position: int | None = None
    created_at: datetime | None = None


def request_tenant(query: str | None, body: LeadIntake | LeadIntakeBatch) -> str:
    """The one tenant of an intake request; raises LeadInvalid when they disagree."""
    stated = {query} if query else set()
    if body.tenant_id:
        stated.add(body.tenant_id)
    items = body.leads if isinstance(body, LeadIntakeBatch) else []
    stated |= {item.tenant_id for item in items if item.tenant_id}
    if len(stated) > 1:
        raise domain.LeadInvalid(
            f"one request is for one tenant; it names {', '.join(sorted(stated))}"
        )
    return stated.pop() if stated else "default"


@dataclass(frozen=True, slots=True)
class IntakeResult:
    lead_id: uuid.UUID
    created: bool
    routed: bool
    sequence: str | None
    reason: str
    #: The request's event_id was applied already: nothing changed.
    duplicate: bool = False


class Catalog:
    """The sequence catalog as one request or one consumed batch reads it: each
    sequence is looked up once."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], domain.CatalogEntry | None] = {}

    async def entry(
        self, conn: asyncpg.Connection, tenant_id: str, key: str
    ) -> domain.CatalogEntry | None:
        if (tenant_id, key) not in self._entries:
            self._entries[(tenant_id, key)] = await repo.catalog_entry(conn, tenant_id, key)
        return self._entries[(tenant_id, key)]


async def intake_lead(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    lead_data: LeadData,
    requested_sequence: str | None,
    default_sequence: str,
    now: datetime,
    catalog: Catalog | None = None,
) -> IntakeResult:
    """Validate, store (deduped by external id and email) and route one lead.

    Raises ``domain.LeadInvalid`` (among others when the sequence it would be routed
    to does not exist or takes no leads); the caller's transaction (or savepoint) then
    writes nothing.
    """
    lead = domain.normalise_lead(lead_data)
    existing = await repo.find_lead_for_update(conn, tenant_id, lead.email, lead.external_id)
    if existing is None:
        lead_id = uuid.uuid4()
        await repo.insert_lead(conn, lead_id, tenant_id, lead, now)
        status, created = "new", True
    else:
        lead_id = existing["id"]
        owner = await repo.email_owner(conn, tenant_id, lead.email)
        if owner is not None and owner != lead_id:
            raise domain.LeadInvalid(
                f"email {lead.email} belongs to another lead than external id {lead.external_id}"
            )
        await repo.merge_lead(conn, lead_id, lead, now)
        status, created = existing["status"], False
    rules = await repo.routing_rules(conn, tenant_id)
    decision = domain.choose_sequence(lead, status, requested_sequence, rules, default_sequence)
    if decision.route and decision.sequence is not None:
        entry = await (catalog or Catalog()).entry(conn, tenant_id, decision.sequence)
        refusal = domain.routing_refusal(decision, entry, tenant_id)
        if refusal is not None:
            raise domain.LeadInvalid(refusal)
    await repo.set_routing(conn, lead_id, decision.sequence, decision.reason, now, decision.rule_id)
    if decision.route and decision.sequence is not None:
        stored = await repo.get_lead(conn, tenant_id, lead_id)
        assert stored is not None
        await enqueue(
            conn,
            topics.LEAD_ROUTED,
            LeadRouted(
                tenant_id=tenant_id,
                lead_id=lead_id,
                lead=LeadSnapshot.model_validate(stored),
                sequence=decision.sequence,
                routing_reason=decision.reason,
            ),
        )
    return IntakeResult(lead_id, created, decision.route, decision.sequence, decision.reason)


async def intake_leads(
    pool: asyncpg.Pool,
    *,
    tenant_id: str,
    items: Sequence[LeadIntake],
    default_sequence: str,
    now: datetime,
) -> list[IntakeResult]:
    """Intake over HTTP: every item in one transaction, all applied or none.

    Each item is validated and applied exactly as on the ``leads`` topic (its
    LeadRouted goes to the outbox in the same transaction). Every item is tried,
    so that the error lists all invalid items; then ``InvalidItems`` rolls it all
    back. An item whose ``event_id`` was applied already (over HTTP or from the
    topic) changes nothing and is answered as a duplicate.
    """
    results: list[IntakeResult] = []
    errors: list[tuple[int, str]] = []
    catalog = Catalog()
    async with pool.acquire() as conn, conn.transaction():
        for index, item in enumerate(items):
            try:
                async with conn.transaction():  # a savepoint: an invalid item leaves nothing
                    if item.event_id is not None and not await repo.claim_event(
                        conn, INTAKE_CONSUMER, item.event_id
                    ):
                        results.append(await _duplicate(conn, tenant_id, item))
                        continue
                    result = await intake_lead(
                        conn,
                        tenant_id=tenant_id,
                        lead_data=item.lead,
                        requested_sequence=item.sequence,
                        default_sequence=default_sequence,
                        now=now,
                        catalog=catalog,
                    )
            except domain.LeadInvalid as exc:
                errors.append((index, str(exc)))
                continue
            results.append(result)
        if errors:
            raise InvalidItems(errors)  # rolls the whole transaction back
    return results


async def _duplicate(conn: asyncpg.Connection, tenant_id: str, item: LeadIntake) -> IntakeResult:
    """The answer to an intake whose event was applied already: the lead as it is."""
    lead = domain.normalise_lead(item.lead)
    stored = await repo.find_lead(conn, tenant_id, lead.email, lead.external_id)
    if stored is None:
        raise domain.LeadInvalid(
            f"event_id {item.event_id} was applied already, to another lead: a new event"
            " needs a new event_id"
        )
    return IntakeResult(
        stored["id"],
        created=False,
        routed=False,
        sequence=stored["sequence"],
        reason=f"event {item.event_id} was applied already: nothing changed",
        duplicate=True,
    )


async def handle_lead_received(
    conn: asyncpg.Connection, events: list[LeadReceived], *, default_sequence: str, now: datetime
) -> list[Rejection]:
    rejections: list[Rejection] = []
    catalog = Catalog()
    for event in events:
        try:
            async with conn.transaction():  # a savepoint: a rejected lead leaves nothing
                await intake_lead(
                    conn,
                    tenant_id=event.tenant_id,
                    lead_data=event.lead,
                    requested_sequence=event.sequence,
                    default_sequence=default_sequence,
                    now=now,
                    catalog=catalog,
                )
        except domain.LeadInvalid as exc:
            rejections.append(Rejection(event, str(exc)))
    return rejections


async def handle_sequence_changed(
    conn: asyncpg.Connection, events: list[SequenceChanged], *, now: datetime
) -> None:
    """Nurture's sequences into the router's catalog (the latest change of each wins)."""
    await repo.apply_sequence_changes(
        conn,
        [
            (
                e.tenant_id,
                e.sequence_key,
                e.sequence_id,
                e.status,
                e.current_version,
                e.occurred_at,
                now,
            )
            for e in events
        ],
    )


async def handle_engagement_received(
    conn: asyncpg.Connection, events: list[EngagementReceived], *, now: datetime
) -> None:
    for event in events:
        current = await repo.lead_status_for_update(conn, event.tenant_id, event.lead_id)
        if current is None:
            continue  # not a lead of ours (erased, or another deployment's)
        change = domain.status_after_engagement(current, event)
        if change is not None:
            await repo.change_status(
                conn,
                event.tenant_id,
                event.lead_id,
                current,
                change.to_status,
                change.reason,
                f"engagement:{event.source}",
                event.event_id,
                now,
            )


async def handle_lead_update_requested(
    conn: asyncpg.Connection, events: list[LeadUpdateRequested], *, now: datetime
) -> list[Rejection]:
    """Sequence actions on leads: status, tags, assignee. A bad request is rejected
    (dead-lettered); a lead that is not ours (erased) is skipped."""
    rejections: list[Rejection] = []
    for event in events:
        state = await repo.lead_state_for_update(conn, event.tenant_id, event.lead_id)
        if state is None:
            continue
        try:
            update = domain.decide_lead_update(state, event)
        except domain.UpdateInvalid as exc:
            rejections.append(Rejection(event, str(exc)))
            continue
        if update.status is not None:
            await repo.change_status(
                conn,
                event.tenant_id,
                event.lead_id,
                state.status,
                update.status.to_status,
                update.status.reason,
                update.changed_by,
                event.event_id,
                now,
            )
        if update.tags is not None:
            await repo.set_lead_tags(conn, event.tenant_id, event.lead_id, update.tags, now)
        if update.assigned_to is not None:
            await repo.assign_lead(conn, event.tenant_id, event.lead_id, update.assigned_to, now)
    return rejections


# ------------------------------------------------------------------- routing rules


def validate_rules(rules: Sequence[RoutingRuleIn]) -> list[domain.RuleSpec]:
    """Every rule validated; raises InvalidItems naming each invalid one."""
    specs: list[domain.RuleSpec] = []
    errors: list[tuple[int, str]] = []
    seen_ids: set[uuid.UUID] = set()
    for index, rule in enumerate(rules):
        if rule.id is not None:
            if rule.id in seen_ids:
                errors.append((index, f"rule id {rule.id} appears more than once"))
            seen_ids.add(rule.id)
        try:
            specs.append(domain.validate_rule(rule.name, rule.match, rule.sequence, rule.enabled))
        except domain.RuleInvalid as exc:
            errors.append((index, str(exc)))
    if errors:
        raise InvalidItems(errors)
    return specs


async def _unknown_sequences(
    conn: asyncpg.Connection, tenant_id: str, specs: Sequence[domain.RuleSpec]
) -> list[tuple[int, str]]:
    """Rules that name a sequence the tenant does not have, as (index, reason)."""
    catalog = Catalog()
    errors: list[tuple[int, str]] = []
    for index, spec in enumerate(specs):
        entry = await catalog.entry(conn, tenant_id, spec.sequence)
        refusal = domain.rule_refusal(spec.sequence, entry, tenant_id)
        if refusal is not None:
            errors.append((index, refusal))
    return errors


async def replace_rules(
    pool: asyncpg.Pool, tenant_id: str, rules: Sequence[RoutingRuleIn], now: datetime
) -> list[dict[str, Any]]:
    """Replace a tenant's whole ordered rule list atomically."""
    specs = validate_rules(rules)
    async with pool.acquire() as conn, conn.transaction():
        unknown_sequences = await _unknown_sequences(conn, tenant_id, specs)
        if unknown_sequences:
            raise InvalidItems(unknown_sequences)
        await repo.lock_routing_rules(conn, tenant_id)
        previous = await repo.delete_all_routing_rules(conn, tenant_id)
        unknown = [(i, r.id) for i, r in enumerate(rules) if r.id and r.id not in previous]
        if unknown:
            raise InvalidItems([(i, f"no rule {rule_id} to keep") for i, rule_id in unknown])
        stored = []
        for position, (rule, spec) in enumerate(zip(rules, specs, strict=True)):
            rule_id = rule.id or uuid.uuid4()
            created_at = previous.get(rule_id, now)
            stored.append(
                await repo.insert_routing_rule(conn, rule_id, tenant_id, position, spec, created_at)
            )
        await repo.mark_rules_configured(conn, tenant_id, now)
    return stored


async def append_rule(
    pool: asyncpg.Pool, tenant_id: str, rule: RoutingRuleIn, now: datetime
) -> dict[str, Any]:
    """Add one rule at the end of a tenant's list (it fires last)."""
    if rule.id is not None:
        raise domain.RuleInvalid("a new rule gets its id from the server: leave id out")
    spec = domain.validate_rule(rule.name, rule.match, rule.sequence, rule.enabled)
    async with pool.acquire() as conn, conn.transaction():
        unknown_sequences = await _unknown_sequences(conn, tenant_id, [spec])
        if unknown_sequences:
            raise domain.RuleInvalid(unknown_sequences[0][1])
        await repo.lock_routing_rules(conn, tenant_id)
        position = await repo.next_rule_position(conn, tenant_id)
        stored = await repo.insert_routing_rule(conn, uuid.uuid4(), tenant_id, position, spec, now)
        await repo.mark_rules_configured(conn, tenant_id, now)
    return stored


async def delete_rule(
    pool: asyncpg.Pool, tenant_id: str, rule_id: uuid.UUID, now: datetime
) -> bool:
    async with pool.acquire() as conn, conn.transaction():
        await repo.lock_routing_rules(conn, tenant_id)
        deleted = await repo.delete_routing_rule(conn, tenant_id, rule_id)
        if deleted:
            await repo.mark_rules_configured(conn, tenant_id, now)
    return deleted


async def seed_default_rules(pool: asyncpg.Pool, tenant_id: str, now: datetime) -> bool:
    """Give a tenant that never had rules the default ones; True when it did."""
    async with pool.acquire() as conn, conn.transaction():
        await repo.lock_routing_rules(conn, tenant_id)
        if await repo.rules_configured(conn, tenant_id):
            return False
        for position, spec in enumerate(domain.DEFAULT_RULES):
            await repo.insert_routing_rule(conn, uuid.uuid4(), tenant_id, position, spec, now)
        await repo.mark_rules_configured(conn, tenant_id, now)
    return True
