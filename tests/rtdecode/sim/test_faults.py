import pytest

from rtdecode.sim.faults import Fault, parse_fault, plan_writes


def test_parse_fault():
    assert parse_fault("late@12:4") == Fault("late", 12, 4.0)
    assert parse_fault("drop@0") == Fault("drop", 0, None)
    assert parse_fault("truncate@3").amount == 0.6
    assert parse_fault("slow@3").amount == 0.8


@pytest.mark.parametrize(
    "text, message",
    [
        ("melt@3", "KIND one of"),
        ("drop", "KIND@INDEX"),
        ("drop@x", "INDEX must be an integer"),
        ("drop@-1", "0 or more"),
        ("late@2:0", "VALUE must be positive"),
        ("truncate@2:1.5", "below 1"),
    ],
)
def test_parse_fault_errors_name_the_text(text, message):
    with pytest.raises(ValueError, match=message) as caught:
        parse_fault(text)
    assert repr(text) in str(caught.value)


def numbers(writes):
    return [(w.series_number, w.volume_number) for w in writes]


def test_plain_plan_is_one_write_per_tr():
    writes = plan_writes(4, 2.0, [])
    assert numbers(writes) == [(1, 1), (1, 2), (1, 3), (1, 4)]
    assert [w.at_s for w in writes] == [0.0, 2.0, 4.0, 6.0]
    assert all(w.mode == "normal" for w in writes)


def test_each_fault_shapes_the_plan():
    faults = [parse_fault(t) for t in ("drop@1", "duplicate@2", "reorder@3", "late@5:2", "truncate@6", "restart@7")]
    writes = plan_writes(9, 1.0, faults, first_series=5)
    assert numbers(writes) == [(5, 1), (5, 3), (5, 3), (5, 5), (5, 4), (5, 7), (5, 6), (6, 1), (6, 2)]
    duplicate = [w for w in writes if w.volume_number == 3]
    assert [w.copy for w in duplicate] == [0, 1] and duplicate[1].at_s > duplicate[0].at_s
    fifth, fourth = writes[3], writes[4]
    assert fifth.at_s == 3.0 and fourth.at_s == pytest.approx(3.1)  # the next one first, in this one's slot
    late = next(w for w in writes if w.volume_number == 6 and w.series_number == 5)
    assert late.at_s == 7.0 and late.acquired_s == 5.0
    assert next(w for w in writes if w.volume_number == 7).mode == "truncate"
    restarted = [w for w in writes if w.series_number == 6]
    assert [w.source_index for w in restarted] == [0, 1]  # data replays from the start


def test_jitter_is_bounded_and_seeded():
    first = plan_writes(50, 1.0, [], jitter_s=0.2, seed=3)
    again = plan_writes(50, 1.0, [], jitter_s=0.2, seed=3)
    assert [w.at_s for w in first] == [w.at_s for w in again]
    assert all(abs(w.at_s - w.acquired_s) <= 0.2 for w in first)


def test_fault_beyond_the_run_is_refused():
    with pytest.raises(ValueError, match="only 4 volumes"):
        plan_writes(4, 1.0, [parse_fault("drop@4")])


def test_fault_text_round_trips():
    for text in ("late@12:4", "drop@0", "truncate@3:0.25"):
        assert str(parse_fault(text)) == text
