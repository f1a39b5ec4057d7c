"""Managing sequences: create, edit (with versions), activate, duplicate, delete.

An edit of a sequence whose version is frozen (it has run, or runs) makes a new
version; enrollments stay on the version they started with. Every change is
validated as a whole before it is written.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import asyncpg

from schemas import topics
from schemas.events import SequenceChanged
from services.nurture import repo
from services.nurture.model import (
    ActionStep,
    ConditionStep,
    EmailStep,
    SequenceInvalid,
    WaitStep,
    assign_keys,
    parse_settings,
    parse_step,
    parse_steps,
    settings_after_patch,
    step_config,
    validate_sequence,
    version_for_edit,
)
from services.nurture.presets import Preset
from services.runtime.outbox import enqueue

AnyStep = EmailStep | WaitStep | ConditionStep | ActionStep
KeyedSteps = list[tuple[str, AnyStep]]


class NotFound(LookupError):
    """No such sequence or step."""


class Conflict(RuntimeError):
    """The operation does not fit the sequence's state."""


def keyed(steps: list[AnyStep]) -> KeyedSteps:
    return list(zip(assign_keys(steps), steps, strict=True))


async def load_steps(conn: asyncpg.Connection | asyncpg.Pool, version_id: uuid.UUID) -> KeyedSteps:
    return [
        (s.key, parse_step({"type": s.kind, "key": s.key, **s.config}))
        for s in await repo.steps_of_version(conn, version_id)
    ]


def step_view(key: str, step: AnyStep) -> dict[str, Any]:
    return {"key": key, "type": step.type, **step_config(step)}


async def view(conn: asyncpg.Connection | asyncpg.Pool, row: asyncpg.Record) -> dict[str, Any]:
    steps = await load_steps(conn, row["version_id"])
    return {
        "id": row["id"],
        "key": row["key"],
        "name": row["name"],
        "description": row["description"],
        "status": row["status"],
        "version": row["current_version"],
        "settings": row["settings"],
        "preset": row["preset"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "steps": [step_view(k, s) for k, s in steps],
    }


async def _get(conn: asyncpg.Connection, tenant_id: str, ref: str) -> asyncpg.Record:
    row = await repo.sequence_by_ref(conn, tenant_id, ref, for_update=True)
    if row is None:
        raise NotFound(f"no sequence {ref!r}")
    return row


async def _announce(
    conn: asyncpg.Connection,
    tenant_id: str,
    key: str,
    sequence_id: uuid.UUID,
    status: str,
    current_version: int | None,
) -> None:
    """Tell the router (topic ``sequences``, through the outbox, in this transaction)
    what the sequence is now: the router refuses leads for sequences it does not know.

    The router keeps the latest change of each sequence by ``occurred_at``, which is
    the database's clock read while this transaction holds the sequence's row: a later
    change (on any replica) always carries a later time."""
    await enqueue(
        conn,
        topics.SEQUENCES,
        SequenceChanged(
            tenant_id=tenant_id,
            sequence_key=key,
            sequence_id=sequence_id,
            status=status,
            current_version=current_version,
            occurred_at=await repo.database_time(conn),
        ),
    )


async def _changed(
    conn: asyncpg.Connection, tenant_id: str, sequence_id: uuid.UUID
) -> asyncpg.Record:
    """The sequence after a change, announced."""
    row = await _get(conn, tenant_id, str(sequence_id))
    await _announce(conn, tenant_id, row["key"], row["id"], row["status"], row["current_version"])
    return row


async def ensure_preset(conn: asyncpg.Connection, tenant_id: str, preset: Preset) -> bool:
    """Create a preset sequence for a tenant that has no sequence of its key (and
    announce it); True when it was created."""
    sequence_id = await repo.ensure_preset(conn, tenant_id, preset)
    if sequence_id is None:
        return False
    await _announce(conn, tenant_id, preset.key, sequence_id, "active", 1)
    return True


async def _write_steps(conn: asyncpg.Connection, version_id: uuid.UUID, steps: KeyedSteps) -> None:
    await repo.delete_steps(conn, version_id)
    await repo.insert_steps(conn, version_id, [(k, s.type, step_config(s)) for k, s in steps])


async def create(
    conn: asyncpg.Connection,
    tenant_id: str,
    key: str,
    name: str,
    description: str,
    settings: dict[str, Any],
    steps: list[dict[str, Any]],
) -> uuid.UUID:
    parsed_settings = parse_settings(settings)
    parsed = keyed(parse_steps(steps))
    validate_sequence([s for _, s in parsed], [k for k, _ in parsed])
    await _check_moves(conn, tenant_id, parsed)
    if await repo.sequence_exists(conn, tenant_id, key):
        raise Conflict(f"a sequence with key {key!r} exists already")
    sequence_id, version_id = await repo.create_sequence(
        conn, tenant_id, key, name, description, parsed_settings.model_dump(exclude_none=True)
    )
    await _write_steps(conn, version_id, parsed)
    await _changed(conn, tenant_id, sequence_id)
    return sequence_id


async def update(
    conn: asyncpg.Connection,
    tenant_id: str,
    ref: str,
    *,
    name: str | None,
    description: str | None,
    settings: dict[str, Any] | None,
) -> asyncpg.Record:
    """Name and description change in place; settings are versioned like steps: a
    change to a frozen version's settings becomes a new version (with the same steps),
    and running enrollments keep the settings of theirs."""
    row = await _get(conn, tenant_id, ref)
    changed = settings_after_patch(row["settings"], settings)
    if changed is not None:
        if row["status"] == "archived":
            raise Conflict("an archived sequence cannot be edited")
        target = version_for_edit(row["status"], row["current_version"], row["frozen"])
        if target.new:
            steps = await load_steps(conn, row["version_id"])
            version_id = await repo.add_version(
                conn, row["id"], target.version, frozen=target.frozen, settings=changed
            )
            await _write_steps(conn, version_id, steps)
        else:
            await repo.set_version_settings(conn, row["version_id"], changed)
    await repo.update_sequence(
        conn,
        row["id"],
        name if name is not None else row["name"],
        description if description is not None else row["description"],
    )
    return await _changed(conn, tenant_id, row["id"])


async def edit_steps(
    conn: asyncpg.Connection, tenant_id: str, ref: str, change: Callable[[KeyedSteps], KeyedSteps]
) -> asyncpg.Record:
    """Apply a change to the steps of the sequence's current version; a frozen version
    is left as it is and the change becomes a new version."""
    row = await _get(conn, tenant_id, ref)
    if row["status"] == "archived":
        raise Conflict("an archived sequence cannot be edited")
    steps = change(await load_steps(conn, row["version_id"]))
    validate_sequence(
        [s for _, s in steps], [k for k, _ in steps], activating=row["status"] == "active"
    )
    await _check_moves(conn, tenant_id, steps)
    target = version_for_edit(row["status"], row["current_version"], row["frozen"])
    if target.new:
        version_id = await repo.add_version(
            conn, row["id"], target.version, frozen=target.frozen, settings=row["settings"]
        )
    else:
        version_id = row["version_id"]
    await _write_steps(conn, version_id, steps)
    return await _changed(conn, tenant_id, row["id"])


async def activate(conn: asyncpg.Connection, tenant_id: str, ref: str) -> asyncpg.Record:
    row = await _get(conn, tenant_id, ref)
    if row["status"] == "active":
        return row
    steps = await load_steps(conn, row["version_id"])
    validate_sequence([s for _, s in steps], [k for k, _ in steps], activating=True)
    await _check_moves(conn, tenant_id, steps)
    await repo.freeze_version(conn, row["version_id"])
    await repo.set_sequence_status(conn, row["id"], "active")
    return await _changed(conn, tenant_id, row["id"])


async def set_status(
    conn: asyncpg.Connection, tenant_id: str, ref: str, status: str
) -> asyncpg.Record:
    """Pause (no new enrollments, running ones go on) or archive."""
    row = await _get(conn, tenant_id, ref)
    if status == "paused" and row["status"] != "active":
        raise Conflict(f"only an active sequence can be paused (it is {row['status']})")
    await repo.set_sequence_status(conn, row["id"], status)
    return await _changed(conn, tenant_id, row["id"])


async def delete(conn: asyncpg.Connection, tenant_id: str, ref: str) -> None:
    row = await _get(conn, tenant_id, ref)
    if row["status"] != "draft":
        raise Conflict(f"only drafts can be deleted; this sequence is {row['status']}: archive it")
    await repo.delete_sequence(conn, row["id"])
    await _announce(conn, tenant_id, row["key"], row["id"], "deleted", None)


async def duplicate(
    conn: asyncpg.Connection, tenant_id: str, ref: str, key: str, name: str | None
) -> uuid.UUID:
    row = await _get(conn, tenant_id, ref)
    steps = await load_steps(conn, row["version_id"])
    return await create(
        conn,
        tenant_id,
        key,
        name or f"{row['name']} (copy)",
        row["description"],
        row["settings"],
        [step_view(k, s) for k, s in steps],
    )


async def _check_moves(conn: asyncpg.Connection, tenant_id: str, steps: KeyedSteps) -> None:
    for key, step in steps:
        if isinstance(step, ActionStep) and step.action == "move_to_sequence":
            assert step.sequence is not None
            if not await repo.sequence_exists(conn, tenant_id, step.sequence):
                raise SequenceInvalid(
                    f"step {key!r}: move_to_sequence names unknown sequence {step.sequence!r}"
                )


# ---------------------------------------------------------------- step changes


def add_step(data: dict[str, Any], position: int | None) -> Callable[[KeyedSteps], KeyedSteps]:
    step = parse_step(data)

    def change(steps: KeyedSteps) -> KeyedSteps:
        keys = assign_keys([*(s for _, s in steps), step])
        new = (step.key or keys[-1], step)
        if step.key and any(k == step.key for k, _ in steps):
            raise SequenceInvalid(f"step key {step.key!r} is used twice")
        index = len(steps) if position is None else max(0, min(position, len(steps)))
        return [*steps[:index], new, *steps[index:]]

    return change


def replace_step(key: str, data: dict[str, Any]) -> Callable[[KeyedSteps], KeyedSteps]:
    step = parse_step({**data, "key": data.get("key") or key})

    def change(steps: KeyedSteps) -> KeyedSteps:
        if not any(k == key for k, _ in steps):
            raise NotFound(f"no step {key!r}")
        assert step.key is not None
        return [(step.key, step) if k == key else (k, s) for k, s in steps]

    return change


def remove_step(key: str) -> Callable[[KeyedSteps], KeyedSteps]:
    def change(steps: KeyedSteps) -> KeyedSteps:
        if not any(k == key for k, _ in steps):
            raise NotFound(f"no step {key!r}")
        return [(k, s) for k, s in steps if k != key]

    return change


def reorder_steps(order: list[str]) -> Callable[[KeyedSteps], KeyedSteps]:
    def change(steps: KeyedSteps) -> KeyedSteps:
        current = [k for k, _ in steps]
        if sorted(order) != sorted(current):
            raise SequenceInvalid(f"order must name every step exactly once: {', '.join(current)}")
        by_key = dict(steps)
        return [(k, by_key[k]) for k in order]

    return change
