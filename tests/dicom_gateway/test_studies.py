"""StudyTracker's quiet-period rule on a fake clock (the end-to-end test cannot time it finely)."""

from types import SimpleNamespace

from dicom_gateway import studies


def test_quiet_period_counts_from_the_last_arrival(monkeypatch):
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(studies, "time", SimpleNamespace(monotonic=lambda: clock.now, time=lambda: 1.7e9 + clock.now))
    sent = []
    tracker = studies.StudyTracker(1.5, lambda uid, last: sent.append((uid, last)) or True)
    tracker.touch("1.2.3")
    clock.now += 0.8
    tracker.touch("1.2.3")
    clock.now += 1.0  # 1.8 s after the first arrival, 1.0 s after the last: not quiet yet
    assert tracker.finalize_due() == 0 and sent == []
    clock.now += 0.5  # 1.5 s after the last
    assert tracker.finalize_due() == 1 and [uid for uid, _ in sent] == ["1.2.3"]
    assert tracker.finalize_due() == 0 and tracker.open_studies() == []


def test_a_study_whose_marker_cannot_be_written_is_still_finalised(tmp_path):
    """The marker only helps a restart; losing it (studies/ removed, a full disk) must not lose the
    study's finalize, which the worklist waits for."""
    from dicom_gateway.spool import Spool

    def refuse(uid):
        raise FileNotFoundError("studies/ is gone")

    sent = []
    tracker = studies.StudyTracker(0.0, lambda uid, last: sent.append(uid) or True, on_open=refuse)
    try:
        tracker.touch("1.2.3")
    except FileNotFoundError:
        pass  # the caller logs it as a best-effort marker failure
    assert tracker.open_studies() == ["1.2.3"]
    assert tracker.finalize_due() == 1 and sent == ["1.2.3"]

    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    spool.studies.rmdir()  # removed by hand while the gateway runs
    spool.mark_study_open("1.2.4")
    assert [uid for uid, _ in spool.open_studies()] == ["1.2.4"]
