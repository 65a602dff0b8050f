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
