"""The pynetdicom Application Entity: association policy, C-ECHO and C-STORE handlers.

The C-STORE contract: Success (0x0000) is returned only after `Spool.store` has made the
instance durable (fsync + atomic rename + directory fsync). Publishing the Celery task is
attempted before answering but its failure does not fail the C-STORE: the outbox sweep
re-publishes. Anything that prevents durable storage answers a failure status with an
ErrorComment giving the reason (never patient data).
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from io import BytesIO
from typing import Callable, Literal

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, Association, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)

from dicom_gateway.config import GatewaySettings
from dicom_gateway.connections import ip_allowed as _ip_allowed
from dicom_gateway.connections import is_this_host
from dicom_gateway.health import HEALTH_CALLING_AE
from dicom_gateway.queue import Outbox, utc_iso
from dicom_gateway.spool import InvalidUIDError, Spool, validate_uid
from dicom_gateway.studies import StudyTracker

log = logging.getLogger("dicom_gateway.scp")

TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
"""What the worker decodes and the tests exchange (pydicom + pylibjpeg/gdcm); nothing else is negotiated.
HTJ2K (1.2.840.10008.1.2.4.201-203) is left out although pylibjpeg-openjpeg reports a decoder for it: no
encoder here makes a test file, and an untested syntax would be accepted with Success and then perhaps
fail in the worker. A sender that proposes only HTJ2K gets "no presentation context" and keeps its copy."""

STORAGE_CLASSES: tuple[UID, ...] = (
    UID(ComputedRadiographyImageStorage),
    UID(DigitalXRayImageStorageForPresentation),
    UID(DigitalXRayImageStorageForProcessing),
)
SECONDARY_CAPTURE = UID(SecondaryCaptureImageStorage)

# C-STORE failure statuses (PS3.4 B.2.3).
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORIZED = 0x0124
CSTORE_FAILURES = (OUT_OF_RESOURCES, DATASET_MISMATCH, CANNOT_UNDERSTAND, SOP_CLASS_NOT_SUPPORTED, NOT_AUTHORIZED)
"""The failures `StoreSCP.on_store` answers; `/metrics` shows each, at 0 until it happens."""

# A-ASSOCIATE-RJ (result, source, diagnostic).
RJ_CALLING_AE = (0x01, 0x01, 0x03)
RJ_CALLED_AE = (0x01, 0x01, 0x07)
RJ_NO_REASON = (0x01, 0x01, 0x01)
RJ_LOCAL_LIMIT = (0x02, 0x03, 0x02)
TOO_MANY_ASSOCIATIONS = "too many associations (TRIAGE_GATEWAY_MAX_ASSOCIATIONS)"
LOW_SPACE = "spool free space below TRIAGE_GATEWAY_MIN_FREE_BYTES"
"""The ErrorComment (at most 64 characters) of a C-STORE refused because it would cross the free-space floor."""
REJECTION_KINDS = {"source IP": "ip_not_allowed", "calling AE": "calling_ae_not_allowed", "called AE": "called_ae_not_ours",
                   "spool free space": "disk_low", "spool not writable": "spool_not_writable",
                   TOO_MANY_ASSOCIATIONS: "too_many_associations"}
"""Reason prefixes -> metric labels; pynetdicom's own rejections are "thread_cap" or "other" (`on_rejected`)."""


def reason_kind(reason: str) -> str:
    """A rejection reason as a metric label (the reason itself carries numbers)."""
    return next((kind for prefix, kind in REJECTION_KINDS.items() if reason.startswith(prefix)), "other")

_HEADER_END = 0x0020000D  # StudyInstanceUID: the last tag we need from the dataset
HEADER_INFLATE_LIMIT = 4 << 20
"""Bytes of a Deflated dataset inflated to find its header: the identifying tags come first, and
inflating a whole upload at once would let a small deflate bomb exhaust the gateway's memory."""
INFLATED_LIMIT = 1 << 30
"""A Deflated dataset is inflated to its end (in chunks, the output discarded) to check that the
stream is complete; one inflating beyond this is refused, as no chest radiograph is that large."""
HEADER_BEYOND_LIMIT = f"deflated: StudyInstanceUID not in first {HEADER_INFLATE_LIMIT >> 20} MiB"
INPUT_SLICE = 64 << 10
"""Compressed bytes handed to zlib per call while inflating a Deflated dataset (see `inflate_head`)."""


def storage_classes(settings: GatewaySettings) -> tuple[UID, ...]:
    """Storage SOP classes we accept; everything else is rejected in negotiation."""
    extra = (SECONDARY_CAPTURE,) if settings.gateway_accept_secondary_capture else ()
    return STORAGE_CLASSES + extra


def build_ae(settings: GatewaySettings) -> AE:
    """An AE with our contexts, limits and timeouts (association policy is in the handlers)."""
    ae = AE(ae_title=settings.gateway_ae_title)
    # The limit is ours (`StoreSCP.on_requested`); pynetdicom's own check counts every acceptor thread
    # alive, those being rejected at the same moment included, so at the limit a burst of senders was
    # turned away below it, unlogged. It stays as a looser cap on threads.
    ae.maximum_associations = pynetdicom_thread_cap(settings.gateway_max_associations)
    ae.maximum_pdu_size = settings.gateway_max_pdu
    ae.acse_timeout = settings.gateway_acse_timeout
    ae.dimse_timeout = settings.gateway_dimse_timeout
    ae.network_timeout = settings.gateway_network_timeout
    ae.add_supported_context(Verification)
    for sop_class in storage_classes(settings):
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


def pynetdicom_thread_cap(limit: int) -> int:
    """pynetdicom's limit on acceptor threads: room above ours for rejections in flight, health probes and
    connections that have not sent their request yet (each holds a thread up to the ACSE timeout)."""
    return limit + max(64, 2 * limit)


HEALTH_PROBE_SLOTS = 2
"""Health probes let in at once beyond TRIAGE_GATEWAY_MAX_ASSOCIATIONS (echo only)."""
ECHO_ONLY_IP = "source IP not in allow-list (health check: C-ECHO only)"
ECHO_ONLY_LIMIT = "health probe beyond TRIAGE_GATEWAY_MAX_ASSOCIATIONS: C-ECHO only"
"""The ErrorComments (at most 64 characters) of a C-STORE on an association let in as a health probe only."""


def _running(associations: set[Association]) -> set[Association]:
    return {a for a in associations if a.is_alive() and not (a.is_released or a.is_aborted)}


class BadDatasetError(ValueError):
    """The dataset cannot be spooled safely; `status` is the C-STORE failure to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


DEFERRED_BYTES = 1 << 16
"""Values longer than this are skipped, not read, when the header is parsed (`read_header`)."""


@dataclass(frozen=True)
class Header:
    sop_class: str
    sop_uid: str
    study_uid: str


def read_header(stream: BytesIO, transfer_syntax: UID) -> Header:
    """The identifying tags of the received dataset (no pixel decode). A plain stream is read to its
    end, raw, so that one cut short is refused here rather than acknowledged and failed later."""
    deflated = transfer_syntax == DeflatedExplicitVRLittleEndian
    head = b""
    try:
        if deflated:  # its head only (the first 4 MiB inflated), after checking the whole stream ends
            with stream.getbuffer() as body:
                head, deflate_state = inflate_head(body)
            ds = read_dataset(BytesIO(head), False, True, stop_when=lambda tag, vr, length: tag > _HEADER_END)
        else:  # every element, raw (no value conversion, no pixel decode): about a millisecond. Values over
            # 64 KiB are skipped, not read (`truncated` measures them still): Pixel Data read here was another
            # copy of the instance pynetdicom already holds, 64 MiB more at the peak for 64 MiB of pixels
            stream.seek(0)
            ds = read_dataset(stream, transfer_syntax == ImplicitVRLittleEndian, True, defer_size=DEFERRED_BYTES)
        header = Header(str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", "")), str(ds.get("StudyInstanceUID", "")))
        empty = len(ds) == 0 and len(stream.getbuffer()) > 0
    except MemoryError as exc:  # the host, not the dataset: the sender should retry (0xC000 is for good)
        raise BadDatasetError(OUT_OF_RESOURCES, "out of memory while parsing the dataset") from exc
    except Exception as exc:  # malformed streams raise anything from struct to zlib errors
        if deflated and len(head) >= HEADER_INFLATE_LIMIT:  # cut inside an element (a long private sequence)
            raise BadDatasetError(CANNOT_UNDERSTAND, HEADER_BEYOND_LIMIT) from exc
        raise BadDatasetError(CANNOT_UNDERSTAND, f"dataset could not be parsed ({type(exc).__name__})") from exc
    finally:
        stream.seek(0)
    if empty:  # pydicom drops everything it read when an undefined-length value runs off the end
        raise BadDatasetError(CANNOT_UNDERSTAND, "dataset could not be parsed (no elements; truncated?)")
    if deflated and deflate_state != "complete":
        raise BadDatasetError(CANNOT_UNDERSTAND, "deflated dataset " + deflate_state)
    if deflated and not header.study_uid and len(head) >= HEADER_INFLATE_LIMIT:  # not "missing": not looked at
        raise BadDatasetError(CANNOT_UNDERSTAND, HEADER_BEYOND_LIMIT)
    if not deflated and truncated(ds, stream):
        raise BadDatasetError(CANNOT_UNDERSTAND, "dataset ends inside an element (truncated)")
    return header


def inflate_head(body: memoryview) -> tuple[bytes, str]:
    """The first `HEADER_INFLATE_LIMIT` bytes of a Deflated dataset, and whether its deflate stream
    is "complete" (else why not: cut short, or inflating beyond `INFLATED_LIMIT`).

    The whole stream is inflated, 1 MiB of output at a time and kept only up to the head, so a
    deflate bomb costs CPU, not memory. Input goes in 64 KiB slices: zlib hands back the input it
    has not used on every call, and handing it the whole upload each time made large datasets
    quadratic (12 s for 256 MiB)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head, inflated, position = bytearray(), 0, 0
    while not inflater.eof and inflated <= INFLATED_LIMIT:
        if inflater.unconsumed_tail:
            piece: bytes | memoryview = inflater.unconsumed_tail
        elif position < len(body):
            piece, position = body[position : position + INPUT_SLICE], position + INPUT_SLICE
        else:
            piece = b""
        chunk = inflater.decompress(piece, 1 << 20)
        if not chunk and not piece:  # input used up and nothing buffered: the stream stops here
            break
        if len(head) < HEADER_INFLATE_LIMIT:
            head += chunk[: HEADER_INFLATE_LIMIT - len(head)]
        inflated += len(chunk)
    if inflated > INFLATED_LIMIT:
        return bytes(head), f"inflates beyond {INFLATED_LIMIT >> 20} MiB"
    return bytes(head), "complete" if inflater.eof else "ends before its deflate stream does (truncated)"


SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0, little endian


def truncated(ds: Dataset, stream: BytesIO) -> bool:
    """pydicom reads a value cut short by the end of the stream without an error: a defined-length
    last element then holds fewer bytes than it declares (a sender that dropped part of Pixel
    Data). It also stops silently when fewer than 8 bytes are left, so a stream cut 1-7 bytes into
    an element's header (Pixel Data's, say) parses as a complete dataset without that element: a
    defined-length last element must therefore end exactly where the stream does. An
    undefined-length one (encapsulated Pixel Data, a sequence) runs to the end of the stream with
    only a warning, which cannot be caught thread-safely; its stream must end with the sequence
    delimiter that closes it instead."""
    elements = list(ds._dict.values())
    if not elements:
        return False
    last = elements[-1]
    with stream.getbuffer() as view:
        size, tail = len(view), bytes(view[-len(SEQUENCE_DELIMITER):])
    if getattr(last, "is_undefined_length", False) or getattr(last, "length", None) == 0xFFFFFFFF:
        return tail != SEQUENCE_DELIMITER
    value_tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if value_tell is None or length is None:  # not a raw element: nothing to measure
        return False
    return value_tell + length != size  # short: value cut; long: a partial element header follows


def _logged_uid(value: object) -> str:
    """A command's UID as logged: a sender that is not pynetdicom may put any text in it, a name even."""
    try:
        return validate_uid(str(value), "UID")
    except InvalidUIDError:
        return "(not a UID)"


def check_header(header: Header, request_sop_class: str, request_sop_uid: str) -> tuple[str, str]:
    """Validate UIDs and their agreement with the C-STORE command; return (study, sop)."""
    try:
        study = validate_uid(header.study_uid, "StudyInstanceUID")
        sop = validate_uid(header.sop_uid, "SOPInstanceUID")
    except InvalidUIDError as exc:
        raise BadDatasetError(CANNOT_UNDERSTAND, str(exc)) from exc
    if sop != str(request_sop_uid).strip():
        raise BadDatasetError(CANNOT_UNDERSTAND, "SOPInstanceUID differs from the command's AffectedSOPInstanceUID")
    if header.sop_class != str(request_sop_class).strip():  # a missing one differs too
        raise BadDatasetError(DATASET_MISMATCH, "SOPClassUID differs from the command's AffectedSOPClassUID")
    return study, sop


def failure(status: int, reason: str) -> Dataset:
    """A C-STORE response status with an ErrorComment (max 64 chars, LO)."""
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = reason[:64]
    return rsp


class StoreSCP:
    """Association policy and DIMSE handlers bound to one spool/outbox/tracker."""

    def __init__(self, settings: GatewaySettings, spool: Spool, outbox: Outbox, tracker: StudyTracker) -> None:
        self.settings = settings
        self.spool = spool
        self.outbox = outbox
        self.tracker = tracker
        self._networks = settings.networks()
        self._allowed_aes = set(settings.gateway_allowed_calling_aes)
        self._ids = itertools.count(1)
        self.stored = 0  # instances acknowledged since start (health/bench)
        self.rejected: Counter[str] = Counter()  # associations refused since start, by reason (metrics)
        self.store_failures: Counter[str] = Counter()  # C-STOREs answered with a failure, by status ("0xA700")
        self._admitted: set[Association] = set()
        self._probes: set[Association] = set()  # health probes let in beyond the limit
        self._admit_lock = threading.Lock()

    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_RELEASED, self.on_closed, ["released"]),
            (evt.EVT_ABORTED, self.on_closed, ["aborted"]),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
        ]

    # ---- association policy -------------------------------------------------------
    def on_requested(self, event: evt.Event) -> None:
        """Reject at association time: unknown IP, unknown calling AE, wrong called AE, low disk."""
        assoc = event.assoc
        assoc.gateway_id = next(self._ids)  # type: ignore[attr-defined]
        rq = assoc.requestor.primitive
        calling, called = str(rq.calling_ae_title).strip(), str(rq.called_ae_title).strip()
        peer = assoc.requestor.address
        reason, rsd = self._policy(calling, called, peer)
        admission = None if reason is not None else self._admit(assoc, calling, peer)
        if reason is None and admission is None:
            reason, rsd = TOO_MANY_ASSOCIATIONS, RJ_LOCAL_LIMIT
        # echo only (the C-STORE's ErrorComment says why): a probe let in by the this-host exception to the IP
        # allow-list, or beyond the limit
        assoc.gateway_echo_only = (ECHO_ONLY_IP if self._health_probe_only(calling, peer)  # type: ignore[attr-defined]
                                   else ECHO_ONLY_LIMIT if admission == "probe" else None)
        ctx = {"assoc": assoc.gateway_id, "calling_ae": calling, "called_ae": called, "peer": peer}
        if reason is None:
            # the container healthcheck's echo, every 30 s: three INFO lines each would bury the modalities'
            assoc.gateway_log_level = (logging.DEBUG if calling == HEALTH_CALLING_AE and self._from_this_host(peer)  # type: ignore[attr-defined]
                                       else logging.INFO)
            log.log(assoc.gateway_log_level, "association requested", extra=ctx)  # type: ignore[attr-defined]
            return
        self.rejected[reason_kind(reason)] += 1
        log.warning("association rejected", extra={**ctx, "reason": reason})
        assoc.gateway_rejected = True  # type: ignore[attr-defined]  (on_rejected counts pynetdicom's own only)
        assoc.acse.send_reject(*rsd)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _admit(self, assoc: Association, calling: str, peer: str) -> Literal["counted", "probe"] | None:
        """Count `assoc` against TRIAGE_GATEWAY_MAX_ASSOCIATIONS if there is room ("counted"); only
        associations let in count, until they end. At the limit the health probe from this host still gets
        one of HEALTH_PROBE_SLOTS, echo only ("probe"): a busy gateway is not a dead one, and a liveness
        probe failing at the limit would restart it mid-transfer. None: refused."""
        with self._admit_lock:
            self._admitted = _running(self._admitted)
            if len(self._admitted) < self.settings.gateway_max_associations:
                self._admitted.add(assoc)
                return "counted"
            if calling == HEALTH_CALLING_AE and self._from_this_host(peer):
                self._probes = _running(self._probes)
                if len(self._probes) < HEALTH_PROBE_SLOTS:
                    self._probes.add(assoc)
                    return "probe"
            return None

    def on_rejected(self, event: evt.Event) -> None:
        """Log and count a rejection that pynetdicom made itself after our handler let the association in:
        its cap on acceptor threads, which connections that never sent a request also hold (a port
        scanner, a load balancer's TCP check) until the ACSE timeout."""
        assoc = event.assoc
        if getattr(assoc, "gateway_rejected", False):
            return
        acceptors = [a for a in assoc.ae.active_associations if a.is_acceptor]
        kind = "thread_cap" if len(acceptors) > assoc.ae.maximum_associations else "other"
        self.rejected[kind] += 1
        log.warning("association rejected", extra={"assoc": getattr(assoc, "gateway_id", None), "reason": (
            f"pynetdicom's cap of {assoc.ae.maximum_associations} connections (open connections count before "
            "they associate)" if kind == "thread_cap" else "rejected by pynetdicom")})

    def _from_this_host(self, peer: str) -> bool:
        return is_this_host(peer, self.settings.gateway_bind)

    def _health_probe_only(self, calling: str, peer: str) -> bool:
        """Let in by the this-host exception alone: `dicom-gateway health` (the container healthcheck)
        calls in from loopback (or the bound address) as TRIAGE-HEALTH, which an IP allow-list of the hospital's networks
        would refuse. Such an association may C-ECHO but not C-STORE, so a local relay (a TLS
        tunnel, say) does not open the IP allow-list to whoever claims the health AE title."""
        return bool(self._networks) and calling == HEALTH_CALLING_AE and self._from_this_host(peer) and not _ip_allowed(peer, self._networks)

    def _policy(self, calling: str, called: str, peer: str) -> tuple[str | None, tuple[int, int, int]]:
        if self._networks and not _ip_allowed(peer, self._networks) and not self._health_probe_only(calling, peer):
            return "source IP not in allow-list", RJ_NO_REASON
        if self._allowed_aes and calling not in self._allowed_aes:
            return "calling AE title not in allow-list", RJ_CALLING_AE
        if self.settings.gateway_require_called_ae and called != self.settings.gateway_ae_title:
            return "called AE title is not ours", RJ_CALLED_AE
        try:
            free = self.spool.free_bytes()
        except OSError:
            free = 0
        if free < self.settings.gateway_min_free_bytes:
            return f"spool free space {free} below threshold", RJ_LOCAL_LIMIT
        if not self.spool.writable():
            restored = self.spool.restore_layout()
            if restored:
                log.warning("spool folders were missing and have been recreated: %s", ", ".join(restored))
            if not (restored and self.spool.writable()):
                return "spool not writable (read-only file system?)", RJ_LOCAL_LIMIT
        return None, RJ_NO_REASON

    def on_established(self, event: evt.Event) -> None:
        """Log what was accepted and what was refused: a PACS pushing a whole study (a CT among its
        X-rays, say) otherwise saw its refusals only on its own side, and the gateway's log named none.
        Not a metric: some senders propose every class they know (DCMTK storescu without -R), so a
        refused proposal is not a refused instance."""
        event.assoc.gateway_stored = 0  # type: ignore[attr-defined]
        accepted = sorted({str(cx.abstract_syntax) for cx in event.assoc.accepted_contexts})
        refused = sorted({str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts} - set(accepted))
        counts: dict[str, object] = {"accepted_classes": accepted}
        if refused:
            counts["refused_classes"] = [_class_name(uid) for uid in refused[:REFUSED_CLASSES_LOGGED]]
            counts["refused_class_count"] = len(refused)
        log.log(_log_level(event), "association established", extra={"assoc": _aid(event), "counts": counts})

    def on_closed(self, event: evt.Event, how: str) -> None:
        stored = getattr(event.assoc, "gateway_stored", 0)
        log.log(_log_level(event), f"association {how}", extra={"assoc": _aid(event), "counts": {"stored": stored}})

    # ---- DIMSE --------------------------------------------------------------------
    def on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def on_store(self, event: evt.Event) -> int | Dataset:
        """Persist, publish, track; Success only once the instance is durable."""
        received = time.time()
        request = event.request
        syntax = UID(event.context.transfer_syntax)
        ctx: dict[str, object] = {"assoc": _aid(event), "sop_class": _logged_uid(request.AffectedSOPClassUID),
                                  "transfer_syntax": str(syntax)}
        stream = request.DataSet
        if not isinstance(stream, BytesIO):  # chunked-to-file receive mode; not used by us
            stream = BytesIO(event.encoded_dataset(include_meta=False))
        try:
            echo_only = getattr(event.assoc, "gateway_echo_only", None)
            if echo_only:
                raise BadDatasetError(NOT_AUTHORIZED, echo_only)
            if str(request.AffectedSOPClassUID).strip() != str(event.context.abstract_syntax):
                raise BadDatasetError(SOP_CLASS_NOT_SUPPORTED, "SOP class not negotiated on this presentation context")
            study, sop = check_header(read_header(stream, syntax), request.AffectedSOPClassUID, request.AffectedSOPInstanceUID)
        except BadDatasetError as exc:
            log.warning("C-STORE refused", extra={**ctx, "status": status_label(exc.status), "reason": str(exc)})
            return self._failed(exc.status, str(exc))
        ctx.update(study_uid=study, sop_uid=sop)
        meta = event.file_meta
        meta.SourceApplicationEntityTitle = str(event.assoc.requestor.ae_title).strip()
        earlier = self.spool.pending_size(study, sop)
        header = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
        if self._below_free_space_floor(len(header) + len(stream.getbuffer())):
            log.warning("C-STORE refused", extra={**ctx, "status": status_label(OUT_OF_RESOURCES), "reason": LOW_SPACE})
            return self._failed(OUT_OF_RESOURCES, LOW_SPACE)
        try:
            with stream.getbuffer() as body:
                size = len(body)
                relpath = self.spool.store([header, body], study, sop)
        except OSError as exc:
            reason = f"spool write failed: {errno.errorcode.get(exc.errno or 0, type(exc).__name__)}"
            log.error("C-STORE not persisted", extra={**ctx, "status": status_label(OUT_OF_RESOURCES), "reason": reason})
            return self._failed(OUT_OF_RESOURCES, reason)
        if earlier is not None:  # a re-send replaces the copy still waiting; a different one is worth a look
            log.warning("C-STORE replaced a pending copy of this instance",
                        extra={**ctx, "counts": {"earlier_file_bytes": earlier, "file_bytes": len(header) + size}})
        # The study's marker before the publish: once the message is out the worker may archive the instance
        # at once, and a gateway killed before writing the marker then found neither the marker nor a pending
        # file at restart, so the study's finalize (its final worklist flag) was never sent.
        try:
            self.tracker.touch(study, received)
        except OSError as exc:  # marker is best effort; the instance itself is safe
            log.warning("study marker not written", extra={**ctx, "error": type(exc).__name__})
        queued = self.outbox.publish(relpath, sop, utc_iso(received))
        event.assoc.gateway_stored = getattr(event.assoc, "gateway_stored", 0) + 1  # type: ignore[attr-defined]
        self.stored += 1
        log.info("C-STORE stored", extra={**ctx, "status": "0x0000", "bytes": size, "relpath": relpath, "queued": queued})
        return 0x0000

    def _below_free_space_floor(self, size: int) -> bool:
        """Whether writing `size` bytes would take the spool below TRIAGE_GATEWAY_MIN_FREE_BYTES. Checked at
        every C-STORE, not only when an association starts: one long association (a PACS pushing a large
        study or a backlog) otherwise filled the disk to the last block, the database beside it too, and was
        refused only by ENOSPC. 0 turns the floor off."""
        floor = self.settings.gateway_min_free_bytes
        if not floor:
            return False
        try:
            free = self.spool.free_bytes()
        except OSError:
            free = 0
        return free - size < floor

    def _failed(self, status: int, reason: str) -> Dataset:
        """Count a refused C-STORE by status: a sender told 0xA700 (spool write failed) or 0xC000 at every
        instance showed in no counter, so monitoring saw a quiet gateway while a modality was failing."""
        self.store_failures[status_label(status)] += 1
        return failure(status, reason)


def status_label(status: int) -> str:
    """A DIMSE status as logged and as the metric label: "0xA700"."""
    return f"0x{status:04X}"


def _aid(event: evt.Event) -> int | None:
    return getattr(event.assoc, "gateway_id", None)


def _log_level(event: evt.Event) -> int:
    """DEBUG for the local health probe's association, INFO for everyone else's (set when requested)."""
    return getattr(event.assoc, "gateway_log_level", logging.INFO)


REFUSED_CLASSES_LOGGED = 16
"""Distinct refused SOP classes named in one association's log line (a peer may offer up to 128)."""


def _class_name(uid: str) -> str:
    """"CT Image Storage (1.2.840.10008.5.1.4.1.1.2)": the name for the admin, the UID for the PACS config.
    A UID pydicom does not know is shown as it came (it is a UID, not a patient identifier)."""
    name = UID(uid).name
    return uid if name == uid else f"{name} ({uid})"


Callback = Callable[[], None]
