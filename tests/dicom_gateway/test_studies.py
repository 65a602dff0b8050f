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


def test_an_arrival_during_the_finalize_publish_is_kept_when_the_wall_clock_stepped_back(monkeypatch):
    """finalize_due told "the study it finalized" from "the study since touched again" by the last arrival's
    wall-clock time. An instance arriving while the finalize was being published, after the clock was stepped
    back (NTP, a VM resumed), kept the later wall time (the max), looked like no arrival at all, and its study
    was dropped from tracking: no finalize after it, and the worker reopens a final study when such an
    instance is claimed, so the study stayed not final. The monotonic clock tells them apart."""
    clock = SimpleNamespace(mono=1000.0, wall=1.7e9)
    monkeypatch.setattr(studies, "time", SimpleNamespace(monotonic=lambda: clock.mono, time=lambda: clock.wall))
    sent = []

    def finalize(uid: str, last: str) -> bool:
        sent.append(uid)
        if len(sent) == 1:  # an instance of the study arrives while its finalize is on the wire
            clock.mono += 0.2
            clock.wall -= 3600.0  # the wall clock was stepped back an hour meanwhile
            tracker.touch(uid)
        return True

    tracker = studies.StudyTracker(1.5, finalize)
    tracker.touch("1.2.3")
    clock.mono += 2.0
    clock.wall += 2.0
    assert tracker.finalize_due() == 1 and sent == ["1.2.3"]
    assert tracker.open_studies() == ["1.2.3"], "the arrival during the publish was dropped"
    clock.mono += 2.0
    assert tracker.finalize_due() == 1 and sent == ["1.2.3", "1.2.3"]  # finalized again after it
    assert tracker.open_studies() == []
