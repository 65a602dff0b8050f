"""TaskPublisher's broker backoff on a fake clock: a dead broker costs one attempt per window,
so a C-STORE never waits on it (the end-to-end durability test cannot tell the difference, as a
stopped Redis refuses connections at once)."""

from types import SimpleNamespace

from dicom_gateway import queue
from dicom_gateway.config import GatewaySettings


class DeadBroker:
    """A Celery app whose broker refuses every connection; counts the attempts."""

    def __init__(self) -> None:
        self.attempts = 0
        self.conf = SimpleNamespace(broker_connection_timeout=1.0)

    def send_task(self, *args, **kwargs):
        self.attempts += 1
        raise ConnectionRefusedError("broker down")


def test_a_dead_broker_costs_one_attempt_per_backoff_window(monkeypatch):
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(queue, "time", SimpleNamespace(monotonic=lambda: clock.now))
    app = DeadBroker()
    publisher = queue.TaskPublisher(GatewaySettings(gateway_broker_backoff_seconds=5.0), app=app)
    assert [publisher.process_instance(f"pending/1/{i}.dcm", str(i), "t") for i in range(50)] == [False] * 50
    assert app.attempts == 1 and publisher.broker_blocked() and "ConnectionRefusedError" in publisher.last_error
    clock.now += 5.0
    assert not publisher.process_instance("pending/1/x.dcm", "x", "t") and app.attempts == 2
    assert not publisher.process_instance("pending/1/y.dcm", "y", "t", force=True) and app.attempts == 3


def test_the_celery_client_does_not_retry_connections_itself():
    conf = queue.make_celery_client(GatewaySettings(gateway_broker_timeout_seconds=1.0)).conf
    assert not conf.broker_connection_retry and conf.broker_transport_options["max_retries"] == 0
