"""Retention policies: which snapshots a ``forget`` keeps, by restic's rules.

This is pure logic with no I/O; it follows restic's ``forget`` (its
``ApplyPolicy``, ``ParseDuration`` and ``GroupSnapshots``, restic 0.16 and later)
so that a policy written for restic means the same here:

* Snapshots are sorted newest first (stably, so equal times keep their order).
* ``last``/``hourly``/``daily``/``weekly``/``monthly``/``yearly`` each count on
  their own: one snapshot may use up a daily and a weekly count at once. A
  kind keeps a snapshot when its bucket (hour, day, ISO week, month, year, in
  the calendar of the snapshot's own time zone) differs from that of the last
  snapshot the kind kept, so only the newest of a bucket is kept. -1 means
  unlimited.
* A kind that still has counts left when the oldest snapshot comes up keeps it
  as well, even if its bucket is already taken ("oldest daily snapshot").
* ``within`` keeps everything newer than the newest snapshot minus the
  duration (the newest snapshot not in the future, not now); the
  ``within_*`` kinds keep the newest of each bucket in that window, and the
  oldest snapshot if it lies in the window.
* ``tags`` keeps every snapshot that has all the tags of one of the lists.

The one deliberate difference: an empty policy keeps everything here, where
restic's ``ApplyPolicy`` would remove everything (its command refuses to run
without a policy unless told to; the command line does that check here).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

UNLIMITED = -1
"""A count meaning "keep all of this kind" (restic's ``unlimited``)."""

GROUP_BY_FIELDS = ("host", "paths", "tags")
"""What snapshots can be grouped by, in the order group keys list them."""

DEFAULT_GROUP_BY = frozenset({"host", "paths"})
"""restic's default for ``--group-by``."""

_UTC = dt.timezone.utc
_US = dt.timedelta(microseconds=1)
_US_PER_SECOND = 1_000_000
_US_PER_HOUR = 3600 * _US_PER_SECOND
_US_PER_DAY = 24 * _US_PER_HOUR
_EPOCH_UTC = dt.datetime(1970, 1, 1, tzinfo=_UTC)
# Go's zero time, which restic measures --keep-within from when every snapshot is in the future.
_GO_ZERO_TIME = dt.datetime(1, 1, 1, tzinfo=_UTC)
# The instants (µs since the epoch) zone offsets are looked up between; beyond them, the nearest.
_LOOKUP_MIN = (dt.datetime(1, 1, 2, tzinfo=_UTC) - _EPOCH_UTC) // _US
_LOOKUP_MAX = (dt.datetime(9999, 12, 30, tzinfo=_UTC) - _EPOCH_UTC) // _US
_MAX_INT64 = 2**63 - 1
_DURATION_UNITS = {"y": "years", "m": "months", "d": "days", "h": "hours"}
_COUNT = re.compile(r"[+-]?[0-9]+")
_GROUP_BY_NAMES = {
    "host": "host",
    "hosts": "host",
    "path": "paths",
    "paths": "paths",
    "tag": "tags",
    "tags": "tags",
}


@dataclass(frozen=True)
class SnapshotMeta:
    """What the policy needs to know about one snapshot.

    Attributes:
        id: The snapshot's id; unique within one call of :func:`apply`.
        time: When the snapshot was taken, timezone-aware. Buckets (day, week,
            ...) use its own calendar fields, so the zone it carries matters.
        host: The host it was taken on.
        paths: The paths it holds.
        tags: Its tags.
    """

    id: str
    time: dt.datetime
    host: str = ""
    paths: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.time.utcoffset() is None:
            raise ValueError(f"snapshot {self.id}: time {self.time} has no time zone")
        for name in ("paths", "tags"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"snapshot {self.id}: {name} must be a sequence of strings")
            object.__setattr__(self, name, tuple(value))


@dataclass(frozen=True)
class Duration:
    """A calendar duration as restic's ``--keep-within*`` take it, e.g. ``1y2m3d4h``.

    Attributes:
        years: Calendar years.
        months: Calendar months.
        days: Calendar days.
        hours: Hours (of 60 minutes, not calendar hours).
    """

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def __str__(self) -> str:
        """restic's spelling: the non-zero parts in the order y, m, d, h ("" if none)."""
        return "".join(
            f"{value}{unit}"
            for value, unit in (
                (self.years, "y"),
                (self.months, "m"),
                (self.days, "d"),
                (self.hours, "h"),
            )
            if value
        )

    def is_zero(self) -> bool:
        """Whether every part is zero (such a duration asks for nothing)."""
        return not (self.years or self.months or self.days or self.hours)

    def subtract_from(self, t: dt.datetime) -> dt.datetime:
        """The time this duration before ``t``, the way restic computes it.

        That is Go's ``t.AddDate(-years, -months, -days)`` (month overflow and
        day overflow normalised, so March 31 minus one month is March 3, or
        March 2 in a leap year) followed by subtracting ``hours`` hours of
        elapsed time.

        Args:
            t: A timezone-aware time.

        Returns:
            The result, in ``t``'s time zone.

        Raises:
            ValueError: If ``t`` has no time zone.
            OverflowError: If the result is outside the years 1 to 9999.
        """
        if t.utcoffset() is None:
            raise ValueError(f"time {t} has no time zone")
        instant = _shift_back_us(t, self)
        return (_EPOCH_UTC + dt.timedelta(microseconds=instant)).astimezone(t.tzinfo)


def parse_duration(text: str) -> Duration:
    """Parse a duration in restic's syntax.

    The text (surrounding whitespace ignored) is a run of ``<number><unit>``
    terms with units ``y``, ``m``, ``d`` and ``h`` in any order, e.g.
    ``1y2m3d4h``, ``4h3d`` or ``2y-5d``; numbers may be negative, a unit given
    twice takes the last value, and ``""`` is the zero duration, as in restic.
    There is no ``unlimited`` for durations.

    Args:
        text: The duration as written.

    Returns:
        The duration.

    Raises:
        ValueError: If a term lacks its number or unit or the unit is unknown
            (``w``, ``s``, ...).
    """
    s = text.strip()
    parts: dict[str, int] = {}
    i = 0
    while i < len(s):
        start = i
        if s[i] == "-":
            i += 1
        j = i
        while j < len(s) and "0" <= s[j] <= "9":
            j += 1
        if j == i:
            raise ValueError(f"invalid duration {text!r}: no number found at {s[start:]!r}")
        if j - i > 18 and int(s[i:j]) > _MAX_INT64:
            raise ValueError(f"invalid duration {text!r}: number {s[i:j]} is too large")
        number = int(s[start:j])
        if j == len(s):
            raise ValueError(f"invalid duration {text!r}: no unit found after number {number}")
        unit = s[j]
        if unit not in _DURATION_UNITS:
            raise ValueError(
                f"invalid duration {text!r}: invalid unit {unit!r} found after number {number}"
                " (use y, m, d or h)"
            )
        parts[_DURATION_UNITS[unit]] = number
        i = j + 1
    return Duration(**parts)


def parse_count(text: str) -> int:
    """Parse a ``--keep-*`` count as restic does: a number >= 0, or ``unlimited``.

    Args:
        text: The count as written.

    Returns:
        The count, :data:`UNLIMITED` (-1) for ``unlimited``.

    Raises:
        ValueError: If the text is not a number or is negative.
    """
    if text == "unlimited":
        return UNLIMITED
    if not _COUNT.fullmatch(text):
        raise ValueError(f"invalid count {text!r}: expected a number or 'unlimited'")
    count = int(text)
    if count < 0:
        raise ValueError(f"invalid count {text!r}: negative values not allowed, use 'unlimited'")
    if count > _MAX_INT64:
        raise ValueError(f"invalid count {text!r}: too large")
    return count


def parse_tag_list(text: str) -> tuple[str, ...]:
    """Parse one ``--keep-tag`` value: tags separated by commas, whitespace stripped.

    As in restic, ``""`` gives ``("",)``, a list that matches untagged snapshots.

    Args:
        text: The tag list as written.

    Returns:
        The tags, in the order given.
    """
    return tuple(tag.strip() for tag in text.split(","))


@dataclass
class Policy:
    """What to keep; every rule adds to what is kept.

    Attributes:
        last: Keep the newest n snapshots.
        hourly: Keep the newest snapshot of each of the newest n hours that have one.
        daily: The same per day.
        weekly: The same per ISO week.
        monthly: The same per month.
        yearly: The same per year.
        within: Keep every snapshot newer than the newest snapshot minus this.
        within_hourly: Keep the newest snapshot of each hour within this of the
            newest snapshot.
        within_daily: The same per day.
        within_weekly: The same per ISO week.
        within_monthly: The same per month.
        within_yearly: The same per year.
        tags: Keep every snapshot that has all the tags of at least one of these
            lists (restic's ``--keep-tag``, one list per option). Reasons name a
            tuple's tags in its order and a frozenset's sorted; ``""`` in a list
            matches a snapshot without tags.

    Counts are 0 (not asked for), n > 0 or :data:`UNLIMITED`; a duration of None
    or zero is not asked for.
    """

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None
    within_hourly: Duration | None = None
    within_daily: Duration | None = None
    within_weekly: Duration | None = None
    within_monthly: Duration | None = None
    within_yearly: Duration | None = None
    tags: list[tuple[str, ...] | frozenset[str]] = field(default_factory=list)

    def _counts(self) -> tuple[int, ...]:
        return (self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly)

    def _durations(self) -> tuple[Duration | None, ...]:
        return (
            self.within,
            self.within_hourly,
            self.within_daily,
            self.within_weekly,
            self.within_monthly,
            self.within_yearly,
        )

    def empty(self) -> bool:
        """Whether nothing is asked for (no counts, durations or tag lists)."""
        if self.tags:
            return False
        return not any(self._counts()) and all(d is None or d.is_zero() for d in self._durations())

    def validate(self) -> None:
        """Reject what restic's ``forget`` rejects: counts below -1, negative durations.

        Raises:
            ValueError: If the policy has such a value.
        """
        if any(count < UNLIMITED for count in self._counts()):
            raise ValueError("negative counts other than -1 (unlimited) are not allowed")
        for d in self._durations():
            if d is not None and min(d.years, d.months, d.days, d.hours) < 0:
                raise ValueError(f"durations with negative values are not allowed: {d}")


def _hour_key(t: dt.datetime) -> int:
    return t.year * 1_000_000 + t.month * 10_000 + t.day * 100 + t.hour


def _day_key(t: dt.datetime) -> int:
    return t.year * 10_000 + t.month * 100 + t.day


def _week_key(t: dt.datetime) -> int:
    iso = t.isocalendar()
    return iso[0] * 100 + iso[1]


def _month_key(t: dt.datetime) -> int:
    return t.year * 100 + t.month


def _year_key(t: dt.datetime) -> int:
    return t.year


_BucketKey = Callable[[dt.datetime], int]
# (bucket key, reason) for last, hourly, ..., yearly; "last" has no key: each snapshot is its own.
_COUNTED: tuple[tuple[_BucketKey | None, str], ...] = (
    (None, "last snapshot"),
    (_hour_key, "hourly snapshot"),
    (_day_key, "daily snapshot"),
    (_week_key, "weekly snapshot"),
    (_month_key, "monthly snapshot"),
    (_year_key, "yearly snapshot"),
)
_WITHIN: tuple[tuple[_BucketKey, str], ...] = (
    (_hour_key, "hourly within"),
    (_day_key, "daily within"),
    (_week_key, "weekly within"),
    (_month_key, "monthly within"),
    (_year_key, "yearly within"),
)


def apply(
    snapshots: Sequence[SnapshotMeta], policy: Policy, *, now: dt.datetime | None = None
) -> tuple[list[SnapshotMeta], list[SnapshotMeta], dict[str, list[str]]]:
    """Decide which snapshots the policy keeps (restic's ``ApplyPolicy``).

    Apply it to one group at a time (see :func:`group`). The input is not changed.

    Args:
        snapshots: The snapshots of one group, in any order; ids must be unique.
        policy: What to keep. An empty one keeps everything (reasons empty).
        now: The current time (default: the clock); snapshots after it are not
            taken as the newest one that ``within*`` counts back from.

    Returns:
        The kept snapshots and the removed ones, each newest first, and for each
        kept id the reasons in restic's words ("last snapshot", "daily snapshot",
        "oldest yearly snapshot", "within 1d", "weekly within 1m",
        "has tags [foo, bar]", ...).

    Raises:
        ValueError: If two snapshots share an id.
        TypeError: If a tag list is a plain string.
    """
    ids = {s.id for s in snapshots}
    if len(ids) != len(snapshots):
        raise ValueError("snapshot ids are not unique")
    ordered = sorted(snapshots, key=lambda s: _instant_us(s.time), reverse=True)
    if policy.empty():
        return ordered, [], {s.id: [] for s in ordered}
    if not ordered:
        return [], [], {}

    now_us = _instant_us(now if now is not None else dt.datetime.now(_UTC))
    latest = next((s.time for s in ordered if _instant_us(s.time) < now_us), _GO_ZERO_TIME)
    within_after = _after(latest, policy.within)
    # (bucket key, reason, instant to be after) of each within_* asked for
    windows = [
        (key_of, f"{reason} {duration}", _shift_back_us(latest, duration))
        for (key_of, reason), duration in zip(_WITHIN, policy._durations()[1:], strict=True)
        if duration is not None and not duration.is_zero()
    ]
    window_key: list[int | None] = [None] * len(windows)
    tag_lists = [_tag_order(tags) for tags in policy.tags]
    left = list(policy._counts())
    last_key: list[int | None] = [None] * len(_COUNTED)

    keep: list[SnapshotMeta] = []
    remove: list[SnapshotMeta] = []
    reasons: dict[str, list[str]] = {}
    oldest = len(ordered) - 1
    for nr, snap in enumerate(ordered):
        why = [f"has tags [{', '.join(tags)}]" for tags in tag_lists if _has_tags(snap, tags)]
        instant = _instant_us(snap.time)
        if within_after is not None and instant > within_after:
            why.append(f"within {policy.within}")
        for i, (key_of, reason) in enumerate(_COUNTED):
            if left[i] > 0 or left[i] == UNLIMITED:
                key = nr if key_of is None else key_of(snap.time)
                if key != last_key[i] or nr == oldest:
                    # Only the oldest snapshot gets here with its bucket already kept.
                    why.append(f"oldest {reason}" if key == last_key[i] else reason)
                    last_key[i] = key
                    if left[i] > 0:
                        left[i] -= 1
        for i, (key_of, reason, after) in enumerate(windows):
            if instant > after:
                key = key_of(snap.time)
                if key != window_key[i] or nr == oldest:
                    why.append(f"oldest {reason}" if key == window_key[i] else reason)
                    window_key[i] = key
        if why:
            keep.append(snap)
            reasons[snap.id] = why
        else:
            remove.append(snap)
    return keep, remove, reasons


def parse_group_by(text: str) -> set[str]:
    """Parse ``--group-by`` as restic does: comma-separated host, paths, tags.

    The singular forms (and "hosts") are accepted too, empty items are skipped,
    and ``""`` means no grouping.

    Args:
        text: The option's value.

    Returns:
        A subset of :data:`GROUP_BY_FIELDS`.

    Raises:
        ValueError: On an unknown name.
    """
    chosen: set[str] = set()
    for item in text.split(","):
        if item == "":
            continue
        if item not in _GROUP_BY_NAMES:
            raise ValueError(f"unknown grouping option: {item!r} (use host, paths and/or tags)")
        chosen.add(_GROUP_BY_NAMES[item])
    return chosen


def group(
    snapshots: Iterable[SnapshotMeta], by: AbstractSet[str]
) -> list[tuple[dict[str, str | tuple[str, ...]], list[SnapshotMeta]]]:
    """Split snapshots into the groups a policy is applied to separately.

    Snapshots fall in the same group when they agree on every chosen field:
    the host, the sorted paths, the sorted tags (duplicates count, as in restic).

    Args:
        snapshots: The snapshots.
        by: A subset of :data:`GROUP_BY_FIELDS`; empty makes one group of all.

    Returns:
        ``(key, snapshots)`` pairs sorted by key, each snapshot list in input
        order. A key maps each chosen field to its value ("host" to a string,
        "paths" and "tags" to sorted tuples); with ``by`` empty it is ``{}``.
        No snapshots give no groups.

    Raises:
        ValueError: If ``by`` names an unknown field.
    """
    unknown = set(by) - set(GROUP_BY_FIELDS)
    if unknown:
        raise ValueError(f"unknown grouping fields: {', '.join(sorted(unknown))}")
    groups: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[SnapshotMeta]] = {}
    for snap in snapshots:
        key = (
            snap.host if "host" in by else "",
            tuple(sorted(snap.paths)) if "paths" in by else (),
            tuple(sorted(snap.tags)) if "tags" in by else (),
        )
        groups.setdefault(key, []).append(snap)
    result: list[tuple[dict[str, str | tuple[str, ...]], list[SnapshotMeta]]] = []
    for key in sorted(groups):
        named: dict[str, str | tuple[str, ...]] = {
            name: value for name, value in zip(GROUP_BY_FIELDS, key, strict=True) if name in by
        }
        result.append((named, groups[key]))
    return result


def _tag_order(tags: Iterable[str]) -> tuple[str, ...]:
    if isinstance(tags, str):
        raise TypeError(f"a tag list must be a tuple or frozenset of tags, not the string {tags!r}")
    if isinstance(tags, AbstractSet):
        return tuple(sorted(tags))
    return tuple(tags)


def _has_tags(snap: SnapshotMeta, tags: tuple[str, ...]) -> bool:
    # restic's Snapshot.HasTags, order and all: "" matches a snapshot without tags at once.
    for tag in tags:
        if tag == "" and not snap.tags:
            return True
        if tag not in snap.tags:
            return False
    return True


def _after(latest: dt.datetime, duration: Duration | None) -> int | None:
    """The instant (µs since the epoch) a snapshot must be after to be within ``duration``."""
    if duration is None or duration.is_zero():
        return None
    return _shift_back_us(latest, duration)


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a proleptic Gregorian date, for any year."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468


def _wall_us(t: dt.datetime) -> int:
    """``t``'s wall clock reading as µs since 1970-01-01 00:00 on the same clock."""
    seconds = (t.hour * 60 + t.minute) * 60 + t.second
    days = _days_from_civil(t.year, t.month, t.day)
    return days * _US_PER_DAY + seconds * _US_PER_SECOND + t.microsecond


def _instant_us(t: dt.datetime) -> int:
    """µs since the Unix epoch (not via Python's same-zone arithmetic, which ignores fold)."""
    offset = t.utcoffset()
    if offset is None:
        raise ValueError(f"time {t} has no time zone")
    return _wall_us(t) - offset // _US


def _offset_us(tz: dt.tzinfo | None, instant: int) -> int:
    """The UTC offset of ``tz`` at an instant (clamped to what datetime can represent)."""
    utc = _EPOCH_UTC + dt.timedelta(microseconds=min(max(instant, _LOOKUP_MIN), _LOOKUP_MAX))
    offset = utc.astimezone(tz).utcoffset()
    return 0 if offset is None else offset // _US


def _shift_back_us(t: dt.datetime, d: Duration) -> int:
    """The instant of Go's ``t.AddDate(-d.years, -d.months, -d.days).Add(-d.hours hours)``."""
    # time.Date normalises the month into the year, then adds the day linearly.
    month0 = t.month - 1 - d.months
    year = t.year - d.years + month0 // 12
    days = _days_from_civil(year, month0 % 12 + 1, 1) + t.day - 1 - d.days
    wall = days * _US_PER_DAY + (_wall_us(t) % _US_PER_DAY)
    # time.Date in a zone: take the offset at the wall reading read as UTC, then
    # the offset at the instant that gives (this picks Go's side of a DST gap or overlap).
    first = _offset_us(t.tzinfo, wall)
    instant = wall - _offset_us(t.tzinfo, wall - first)
    return instant - d.hours * _US_PER_HOUR
