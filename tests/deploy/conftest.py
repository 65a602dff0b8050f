"""The gateway tests' real peers (a private redis-server, DCMTK, sample studies) for the main-job test."""

from tests.dicom_gateway.conftest import dcmtk, images, make_study, redis_server  # noqa: F401  (fixtures)
