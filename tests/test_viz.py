"""Shared plots and tables, and the exercise-check helpers."""
import matplotlib

matplotlib.use("Agg")  # this test process only; notebooks keep their own backend

import pytest

from labkit import checks, viz


def test_gantt_draws_one_bar_per_event_on_its_lane():
    events = [{"lane": 0, "kind": "forward", "start": 0.0, "end": 0.01, "label": "F0"},
              {"lane": 1, "kind": "forward", "start": 0.01, "end": 0.02, "label": "F0"},
              {"lane": 1, "kind": "backward", "start": 0.02, "end": 0.04, "label": "B0"},
              {"lane": 0, "kind": "backward", "start": 0.04, "end": 0.06}]
    ax = viz.gantt(events, title="t")
    bars = ax.patches
    assert len(bars) == 4
    assert sorted(round(b.get_width(), 6) for b in bars) == [10.0, 10.0, 20.0, 20.0]  # ms
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1"]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"forward", "backward"}


def test_gantt_rejects_bad_events():
    with pytest.raises(ValueError, match="no events"):
        viz.gantt([])
    with pytest.raises(ValueError, match="lacks"):
        viz.gantt([{"lane": 0, "start": 0.0}])


def test_tables_align_and_format():
    rows = [{"name": "ring", "ms": 1.23456, "n": 4}, {"name": "library", "ms": 10.0, "n": 4}]
    text = viz.format_table(rows).splitlines()
    assert text[0].split() == ["name", "ms", "n"]
    assert text[2].startswith("ring ") and text[3].startswith("library")  # text left-aligned
    assert text[2].index("1.235") + len("1.235") == text[3].index("10") + len("10")  # numbers right-aligned
    assert "<td>1.235</td>" in viz.table_html(rows)
    assert viz.format_table([]) == "(no rows)"


def test_checks_report_pass_fail_and_not_attempted():
    def good():
        checks.expect_close([1.0, 2.0], [1.0, 2.0 + 1e-9])

    def bad():
        checks.expect_close([1.0], [1.5], what="sum")

    res = checks.run_cases("demo", [("good", good), ("bad", bad)], hint="look again")
    assert not res.passed and [c.ok for c in res.cases] == [True, False]
    assert "sum: max abs error 0.5" in res.failed_cases[0].detail
    assert "hint: look again" in res.summary() and "&#10008;" in res._repr_html_()
    with pytest.raises(AssertionError, match="FAILED"):
        res.raise_if_failed()

    def stub():
        raise NotImplementedError

    todo = checks.run_cases("todo", [("a", stub)])
    assert not todo.attempted and not todo.passed and "not attempted" in todo.summary()
    assert checks.run_cases("ok", [("good", good)]).passed
