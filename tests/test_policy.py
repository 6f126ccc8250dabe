"""The retention policy engine against restic's own test cases.

tests/data/policy/ carries restic's TestApplyPolicy over as data (see its
README.md): the 103 input snapshots, and for each of the 40 policies of
restic's table the snapshots its golden file keeps, in order, with the reasons.
The duration and group-by tables are restic's too; the results of subtracting
durations in time zones were computed with Go's time package.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from pysrbup.client.policy import (
    DEFAULT_GROUP_BY,
    UNLIMITED,
    Duration,
    Policy,
    SnapshotMeta,
    apply,
    group,
    parse_count,
    parse_duration,
    parse_group_by,
    parse_tag_list,
)

DATA = Path(__file__).parent / "data" / "policy"
CASES = sorted(DATA.glob("policy_keep_snapshots_*.json"), key=lambda p: int(p.stem.rsplit("_")[-1]))
UTC = dt.timezone.utc


def _snapshots() -> list[SnapshotMeta]:
    raw = json.loads((DATA / "snapshots.json").read_text())["snapshots"]
    return [
        SnapshotMeta(
            id=s["id"],
            time=dt.datetime.fromisoformat(s["time"]),
            paths=tuple(s["paths"]),
            tags=tuple(s["tags"]),
        )
        for s in raw
    ]


SNAPSHOTS = _snapshots()


def _policy(spec: dict) -> Policy:
    kwargs: dict = {}
    for name, value in spec.items():
        if name.startswith("within"):
            kwargs[name] = parse_duration(value)
        elif name == "tags":
            kwargs[name] = [tuple(tags) for tags in value]
        else:
            kwargs[name] = value
    return Policy(**kwargs)


def _at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def _snap(id_: str, time: str, **kwargs) -> SnapshotMeta:
    return SnapshotMeta(id=id_, time=dt.datetime.fromisoformat(time), **kwargs)


def _zone(name: str) -> dt.tzinfo:
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        return zoneinfo.ZoneInfo(name)
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip(f"no time zone data for {name}")


# --- restic's TestApplyPolicy -------------------------------------------------


def test_carried_over_data_is_complete():
    assert len(SNAPSHOTS) == 103
    assert len({s.id for s in SNAPSHOTS}) == 103
    assert [int(p.stem.rsplit("_")[-1]) for p in CASES] == list(range(40))


@pytest.mark.parametrize("path", CASES[1:], ids=lambda p: p.stem.rsplit("_")[-1])
def test_restic_policy_case(path):
    case = json.loads(path.read_text())
    keep, remove, reasons = apply(SNAPSHOTS, _policy(case["policy"]))

    assert [(s.id, s.time.isoformat(timespec="microseconds")) for s in keep] == [
        (k["id"], k["time"]) for k in case["keep"]
    ]
    assert reasons == {k["id"]: k["matches"] for k in case["keep"]}
    assert list(reasons) == [s.id for s in keep]
    # keep and remove split the input, each newest first
    assert sorted(s.id for s in keep + remove) == sorted(s.id for s in SNAPSHOTS)
    for part in (keep, remove):
        assert part == sorted(part, key=lambda s: s.time, reverse=True)


def test_restic_case_0_empty_policy_keeps_everything():
    # restic's ApplyPolicy removes everything under an empty policy (its golden
    # file keeps nothing) and its forget refuses to run with one; here an empty
    # policy keeps all, and the command line does the refusing.
    case = json.loads(CASES[0].read_text())
    assert case["policy"] == {}
    assert case["keep"] == []
    keep, remove, reasons = apply(SNAPSHOTS, _policy(case["policy"]))
    assert len(keep) == len(SNAPSHOTS)
    assert remove == []
    assert reasons == {s.id: [] for s in SNAPSHOTS}
    assert keep == sorted(SNAPSHOTS, key=lambda s: s.time, reverse=True)


def test_apply_does_not_change_its_input():
    snaps = list(SNAPSHOTS)
    apply(snaps, Policy(daily=3))
    assert snaps == SNAPSHOTS


# restic's TestExpireSnapshotOps (the Empty half), and a few more
@pytest.mark.parametrize(
    ("policy", "empty"),
    [
        (Policy(), True),
        (Policy(tags=[]), True),
        (Policy(daily=7, weekly=2, monthly=3, yearly=10), False),
        (Policy(within=Duration()), True),
        (Policy(within=parse_duration("")), True),
        (Policy(within_weekly=Duration(hours=1)), False),
        (Policy(last=UNLIMITED), False),
        (Policy(tags=[()]), False),
    ],
)
def test_policy_empty(policy, empty):
    assert policy.empty() is empty


# --- rules worth pinning on their own -----------------------------------------


def test_equal_times_keep_their_input_order():
    snaps = [_snap(n, "2024-01-01T00:00:00+00:00") for n in ("b", "a", "c")]
    keep, remove, reasons = apply(snaps, Policy(last=2))
    assert [s.id for s in keep] == ["b", "a"]
    assert [s.id for s in remove] == ["c"]
    assert reasons == {"b": ["last snapshot"], "a": ["last snapshot"]}


def test_oldest_snapshot_kept_while_counts_are_left():
    snaps = [
        _snap("new", "2024-03-02T10:00:00+00:00"),
        _snap("mid", "2024-03-01T12:00:00+00:00"),
        _snap("old", "2024-03-01T08:00:00+00:00"),
    ]
    keep, _, reasons = apply(snaps, Policy(daily=5))
    assert [s.id for s in keep] == ["new", "mid", "old"]
    assert reasons["old"] == ["oldest daily snapshot"]
    # with the counts used up, the oldest goes
    keep, remove, _ = apply(snaps, Policy(daily=2))
    assert [s.id for s in keep] == ["new", "mid"]
    assert [s.id for s in remove] == ["old"]


def test_buckets_use_the_snapshots_own_calendar():
    # the same UTC day, but two local days in New York time (-05:00)
    snaps = [
        _snap("late", "2024-01-10T20:00:00-05:00"),  # 01:00 UTC on the 11th
        _snap("early", "2024-01-10T09:00:00-05:00"),
        _snap("before", "2024-01-09T21:00:00-05:00"),  # 02:00 UTC on the 10th
    ]
    keep, _, reasons = apply(snaps, Policy(daily=2))
    assert [s.id for s in keep] == ["late", "before"]
    assert reasons == {"late": ["daily snapshot"], "before": ["daily snapshot"]}


def test_weekly_uses_iso_weeks_across_new_year():
    # 2020-12-31 and 2021-01-03 are both in ISO week 2020-53; 2021-01-04 starts 2021-01
    snaps = [
        _snap("mon", "2021-01-04T12:00:00+00:00"),
        _snap("sun", "2021-01-03T12:00:00+00:00"),
        _snap("thu", "2020-12-31T12:00:00+00:00"),
        _snap("wed", "2020-12-23T12:00:00+00:00"),
    ]
    keep, _, _ = apply(snaps, Policy(weekly=3))
    assert [s.id for s in keep] == ["mon", "sun", "wed"]


def test_within_counts_from_the_newest_snapshot_not_from_now():
    snaps = [
        _snap("a", "2000-01-10T00:00:00+00:00"),
        _snap("b", "2000-01-09T01:00:00+00:00"),
        _snap("c", "2000-01-09T00:00:00+00:00"),  # exactly 1d before: not after it
    ]
    keep, remove, reasons = apply(snaps, Policy(within=parse_duration("1d")))
    assert [s.id for s in keep] == ["a", "b"]
    assert [s.id for s in remove] == ["c"]
    assert reasons["a"] == ["within 1d"]


def test_within_ignores_snapshots_in_the_future_when_finding_the_newest():
    now = _at("2024-01-10T00:00:00")
    snaps = [
        _snap("future", "2024-06-01T00:00:00+00:00"),
        _snap("newest", "2024-01-09T00:00:00+00:00"),
        _snap("in", "2024-01-08T12:00:00+00:00"),
        _snap("out", "2024-01-07T00:00:00+00:00"),
    ]
    keep, _, _ = apply(snaps, Policy(within=parse_duration("1d")), now=now)
    assert [s.id for s in keep] == ["future", "newest", "in"]
    # all in the future: restic counts back from Go's zero time, so all are within
    keep, remove, _ = apply(snaps, Policy(within=parse_duration("1d")), now=_at("2000-01-01"))
    assert len(keep) == 4 and remove == []


def test_within_buckets_keep_the_oldest_only_inside_the_window():
    snaps = [
        _snap("a", "2024-01-02T10:00:00+00:00"),
        _snap("b", "2024-01-01T12:00:00+00:00"),
        _snap("c", "2024-01-01T09:00:00+00:00"),
    ]
    _, _, reasons = apply(snaps, Policy(within_daily=parse_duration("2d")))
    assert reasons == {
        "a": ["daily within 2d"],
        "b": ["daily within 2d"],
        "c": ["oldest daily within 2d"],
    }
    keep, _, _ = apply(snaps, Policy(within_daily=parse_duration("1d")))
    assert [s.id for s in keep] == ["a", "b"]


def test_keep_tag_lists():
    snaps = [
        _snap("none", "2024-01-03T00:00:00+00:00"),
        _snap("foo", "2024-01-02T00:00:00+00:00", tags=("foo",)),
        _snap("both", "2024-01-01T00:00:00+00:00", tags=("bar", "foo")),
    ]
    _, _, reasons = apply(snaps, Policy(tags=[frozenset({"foo", "bar"}), ("foo",)]))
    assert reasons == {"foo": ["has tags [foo]"], "both": ["has tags [bar, foo]", "has tags [foo]"]}
    # "" stands for "no tags", and as in restic's HasTags it decides at once where it stands
    _, _, reasons = apply(snaps, Policy(tags=[("",)]))
    assert reasons == {"none": ["has tags []"]}
    _, _, reasons = apply(snaps, Policy(tags=[("", "foo")]))
    assert reasons == {"none": ["has tags [, foo]"]}
    _, _, reasons = apply(snaps, Policy(tags=[("foo", "")]))
    assert reasons == {}
    with pytest.raises(TypeError):
        apply(snaps, Policy(tags=["foo"]))  # type: ignore[list-item]


def test_apply_rejects_duplicate_ids_and_accepts_nothing():
    with pytest.raises(ValueError, match="unique"):
        apply([_snap("x", "2024-01-01T00:00:00+00:00")] * 2, Policy(last=1))
    assert apply([], Policy(last=1)) == ([], [], {})
    assert apply([], Policy()) == ([], [], {})


def test_snapshot_needs_an_aware_time():
    with pytest.raises(ValueError, match="time zone"):
        SnapshotMeta(id="x", time=dt.datetime(2024, 1, 1))
    assert SnapshotMeta(id="x", time=_at("2024-01-01"), tags=["a"]).tags == ("a",)  # type: ignore[arg-type]


# --- durations: restic's TestParseDuration (and TestNextNumber) ---------------


@pytest.mark.parametrize(
    ("text", "duration", "spelled"),
    [
        ("9h", Duration(hours=9), "9h"),
        ("3d", Duration(days=3), "3d"),
        ("4d2h", Duration(days=4, hours=2), "4d2h"),
        ("7m5d", Duration(months=7, days=5), "7m5d"),
        ("6m4d8h", Duration(months=6, days=4, hours=8), "6m4d8h"),
        ("5d7m", Duration(months=7, days=5), "7m5d"),
        ("4h3d9m", Duration(months=9, days=3, hours=4), "9m3d4h"),
        ("-7m5d", Duration(months=-7, days=5), "-7m5d"),
        ("1y4m-5d-3h", Duration(years=1, months=4, days=-5, hours=-3), "1y4m-5d-3h"),
        ("2y7m-5d", Duration(years=2, months=7, days=-5), "2y7m-5d"),
        # beyond restic's table, by the same code
        ("", Duration(), ""),
        ("  5d  ", Duration(days=5), "5d"),
        ("1d2d", Duration(days=2), "2d"),
        ("1y2m3d3h", Duration(years=1, months=2, days=3, hours=3), "1y2m3d3h"),
        ("0d", Duration(), ""),
    ],
)
def test_parse_duration(text, duration, spelled):
    parsed = parse_duration(text)
    assert parsed == duration
    assert str(parsed) == spelled


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2w", "invalid unit 'w' found after number 2"),
        ("1y4m3w1d", "invalid unit 'w' found after number 3"),
        ("s", "no number found"),
        ("\u07c0", "no number found"),  # NKO DIGIT ZERO: ASCII digits only
        ("5", "no unit found after number 5"),
        ("-d", "no number found"),
        ("--5d", "no number found"),
        ("5d 3h", "no number found"),
        ("unlimited", "no number found"),
        ("1D", "invalid unit 'D'"),
        ("99999999999999999999d", "too large"),
    ],
)
def test_parse_duration_rejects(text, message):
    with pytest.raises(ValueError, match="invalid duration") as err:
        parse_duration(text)
    assert message in str(err.value)


# Go's t.AddDate(-y, -m, -d).Add(-h * time.Hour), results computed with Go 1.19.
@pytest.mark.parametrize(
    ("zone", "start", "duration", "go_result_utc"),
    [
        ("UTC", "2023-03-31T12:00:00", "1m", "2023-03-03T12:00:00"),
        ("UTC", "2024-03-31T12:00:00", "1m", "2024-03-02T12:00:00"),
        ("UTC", "2024-02-29T12:00:00", "1y", "2023-03-01T12:00:00"),
        ("UTC", "2023-01-31T12:00:00", "-1m", "2023-03-03T12:00:00"),
        ("UTC", "2016-01-18T12:02:03", "1y2m3d3h", "2014-11-15T09:02:03"),
        # lands in a DST gap / overlap: Go's choice, not Python's fold=0
        ("America/New_York", "2013-04-10T02:34:00", "31d", "2013-03-10T06:34:00"),
        ("America/New_York", "2023-12-05T01:30:00", "1m", "2023-11-05T05:30:00"),
        ("Europe/London", "2023-11-29T01:30:00", "1m", "2023-10-29T01:30:00"),
        ("Europe/Berlin", "2024-11-27T02:30:00", "31d", "2024-10-27T01:30:00"),
        ("Europe/Berlin", "2024-04-30T02:30:00", "30d", "2024-03-31T01:30:00"),
    ],
)
def test_subtract_duration_like_go(zone, start, duration, go_result_utc):
    tz = UTC if zone == "UTC" else _zone(zone)
    t = dt.datetime.fromisoformat(start).replace(tzinfo=tz)
    result = parse_duration(duration).subtract_from(t)
    assert result.tzinfo is tz
    assert result.astimezone(UTC) == _at(go_result_utc)


def test_subtract_duration_out_of_range():
    with pytest.raises(OverflowError):
        Duration(years=9999).subtract_from(_at("2016-01-18T12:02:03"))


# --- counts, tag lists, policy checks -----------------------------------------


@pytest.mark.parametrize(("text", "count"), [("unlimited", -1), ("0", 0), ("7", 7), ("+5", 5)])
def test_parse_count(text, count):
    assert parse_count(text) == count


@pytest.mark.parametrize("text", ["-1", "-5", "", "abc", " 5", "1_0", "1.5", "all"])
def test_parse_count_rejects(text):
    with pytest.raises(ValueError, match="invalid count"):
        parse_count(text)


@pytest.mark.parametrize(
    ("text", "tags"),
    [("foo", ("foo",)), ("foo, bar", ("foo", "bar")), ("", ("",)), ("foo,", ("foo", ""))],
)
def test_parse_tag_list(text, tags):
    assert parse_tag_list(text) == tags


def test_policy_validate():
    Policy(last=UNLIMITED, daily=3, within=parse_duration("1y")).validate()
    with pytest.raises(ValueError, match="negative counts"):
        Policy(daily=-2).validate()
    with pytest.raises(ValueError, match="negative values"):
        Policy(within_daily=parse_duration("1y-2d")).validate()


# --- group-by: restic's TestGroupByOptions, and grouping ----------------------


@pytest.mark.parametrize(
    ("text", "chosen"),
    [
        ("", set()),
        ("host,paths", {"host", "paths"}),
        ("host,path,tag", {"host", "paths", "tags"}),
        ("hosts,paths,tags", {"host", "paths", "tags"}),
        ("tags,,host", {"host", "tags"}),
    ],
)
def test_parse_group_by(text, chosen):
    assert parse_group_by(text) == chosen


@pytest.mark.parametrize("text", ["tags,invalid", "host, paths", "HOST", "time"])
def test_parse_group_by_rejects(text):
    with pytest.raises(ValueError, match="unknown grouping option"):
        parse_group_by(text)


GROUPED = [
    _snap("1", "2024-01-01T00:00:00+00:00", host="b", paths=("/y", "/x"), tags=("t2", "t1")),
    _snap("2", "2024-01-02T00:00:00+00:00", host="a", paths=("/x", "/y")),
    _snap("3", "2024-01-03T00:00:00+00:00", host="b", paths=("/x", "/y"), tags=("t1", "t2")),
    _snap("4", "2024-01-04T00:00:00+00:00", host="b", paths=("/z",), tags=("t1",)),
]


def _ids(groups):
    return [(key, [s.id for s in snaps]) for key, snaps in groups]


def test_group_by_nothing_is_one_group():
    assert _ids(group(GROUPED, set())) == [({}, ["1", "2", "3", "4"])]
    assert group([], {"host"}) == []


def test_group_by_host_and_paths():
    assert _ids(group(GROUPED, DEFAULT_GROUP_BY)) == [
        ({"host": "a", "paths": ("/x", "/y")}, ["2"]),
        ({"host": "b", "paths": ("/x", "/y")}, ["1", "3"]),
        ({"host": "b", "paths": ("/z",)}, ["4"]),
    ]


def test_group_by_each_field():
    assert _ids(group(GROUPED, {"host"})) == [
        ({"host": "a"}, ["2"]),
        ({"host": "b"}, ["1", "3", "4"]),
    ]
    assert _ids(group(GROUPED, {"tags"})) == [
        ({"tags": ()}, ["2"]),
        ({"tags": ("t1",)}, ["4"]),
        ({"tags": ("t1", "t2")}, ["1", "3"]),
    ]
    assert _ids(group(GROUPED, parse_group_by("host,paths,tags"))) == [
        ({"host": "a", "paths": ("/x", "/y"), "tags": ()}, ["2"]),
        ({"host": "b", "paths": ("/x", "/y"), "tags": ("t1", "t2")}, ["1", "3"]),
        ({"host": "b", "paths": ("/z",), "tags": ("t1",)}, ["4"]),
    ]


def test_group_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown grouping fields: time"):
        group(GROUPED, {"host", "time"})


def test_policy_applies_per_group():
    kept = {
        tuple(key.values()): [s.id for s in apply(snaps, Policy(last=1))[0]]
        for key, snaps in group(GROUPED, {"host"})
    }
    assert kept == {("a",): ["2"], ("b",): ["4"]}
