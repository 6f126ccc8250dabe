"""``forget``: apply a retention policy (restic's rules, see policy.py), then collect once.

Backups are grouped (by default by host and paths), the policy decides per
group, and every record to remove is deleted before one garbage collection
runs for all of them, with the same safety against concurrent backups as a
single delete.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pysrbup.client import policy
from pysrbup.client.gc import GcResult, collect_garbage
from pysrbup.client.repository import RemoteRepository
from pysrbup.client.selection import Listed


@dataclass
class GroupDecision:
    """What the policy decided for one group."""

    key: dict
    keep: list[Listed] = field(default_factory=list)
    remove: list[Listed] = field(default_factory=list)
    reasons: dict[str, list[str]] = field(default_factory=dict)


def meta_of(item: Listed) -> policy.SnapshotMeta:
    return policy.SnapshotMeta(
        id=item.id, time=item.time, host=item.host, paths=(item.path,), tags=tuple(item.tags)
    )


def decide(backups: list[Listed], rules: policy.Policy, group_by: set[str]) -> list[GroupDecision]:
    """The policy's decision for each group of ``backups``."""
    by_id = {item.id: item for item in backups}
    decisions = []
    for key, members in policy.group([meta_of(b) for b in backups], group_by):
        keep, remove, reasons = policy.apply(members, rules)
        decisions.append(
            GroupDecision(
                key=key,
                keep=[by_id[m.id] for m in keep],
                remove=[by_id[m.id] for m in remove],
                reasons=reasons,
            )
        )
    return decisions


def forget(repo: RemoteRepository, decisions: list[GroupDecision]) -> GcResult | None:
    """Deletes every record the decisions remove, then collects garbage once."""
    doomed = [item.id for d in decisions for item in d.remove]
    if not doomed:
        return None
    for backup_id in doomed:
        repo.delete_snapshot(backup_id)
    return collect_garbage(repo)
