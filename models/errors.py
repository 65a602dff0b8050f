"""Errors raised by the serving contract.

They carry a short, PHI-free reason that the worker stores in its result row,
so each message must name the problem without quoting patient data.
"""

import re

UID_STRING = re.compile(r"[0-9]{1,64}(\.[0-9]{1,64})*")
STRICT_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
"""A UID as PS3.5 9.1 writes one: two components or more, none with a leading zero (a bare number,
a record number say, is not one)."""

MODALITIES = frozenset("""
    AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL
    IVOCT IVUS KER KO LEN LS M3D MG MR NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS PR
    PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR
    SR SRF STAIN TEXTUREMAP TG US VA XA XAPROTOCOL XC
    AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF
""".split())
"""Modality (0008,0060) defined terms, current and retired (PS3.3 C.7.3.1.1.1)."""
VIEW_POSITIONS = frozenset("AP PA LL RL RLD LLD RLO LLO LATERAL LAT".split())
"""View Position (0018,5101) defined terms of CR/DX (PS3.3 C.8.11.5), and the LATERAL/LAT some vendors write."""
BODY_PARTS = frozenset("""
    SKULL HEAD FACE ORBIT SINUS NOSE JAW MANDIBLE TMJ NECK CSPINE TSPINE LSPINE SSPINE COCCYX SPINE
    CHEST THORAX RIB STERNUM CLAVICLE SCAPULA SHOULDER BREAST HEART LUNG ABDOMEN PELVIS ABDOMENPELVIS
    CHESTABDOMEN CHESTABDPELVIS KIDNEY HIP SIJOINT ARM HUMERUS ELBOW FOREARM WRIST HAND FINGER THUMB
    LEG FEMUR KNEE PATELLA TIBIA FIBULA ANKLE HEEL FOOT TOE EXTREMITY UPRLIMB LWRLIMB WHOLEBODY
""".split())
"""Common Body Part Examined (0018,0015) terms (PS3.16 Annex L); others are described, not repeated."""
PHOTOMETRIC_INTERPRETATIONS = frozenset("""
    MONOCHROME1 MONOCHROME2 RGB HSV ARGB CMYK YBR_FULL YBR_FULL_422 YBR_PARTIAL_422 YBR_PARTIAL_420
    YBR_ICT YBR_RCT XYB
""".split()) | {"PALETTE COLOR"}
"""Photometric Interpretation (0028,0004) enumerated values, current and retired (PS3.3 C.7.6.3.1.2)."""
ORIENTATION_CODE = re.compile(r"[APLRHF]{1,3}")
"""One Patient Orientation (0020,0020) value: patient directions, the principal one first (PS3.3 C.7.6.1.1.1)."""


def quoted_term(value: object, terms: frozenset[str]) -> str:
    """A coded value (Modality, View Position...) as a reason may repeat it: one of its element's
    defined `terms`, else "(non-standard value)".

    With pydicom's validation off (the worker's setting) a CS element can hold any text, and the
    CS repertoire alone (capitals and digits, 16 characters) admits a medical record number or a
    short name, so only the standard's own terms are repeated into reasons, logs and exports.
    """
    text = str(value).strip().upper()
    return text if text in terms else "(non-standard value)"


def quoted_orientation(value: object) -> str:
    """One Patient Orientation value as a reason may repeat it (letters A, P, L, R, H, F only)."""
    text = str(value).strip().upper()
    return text if ORIENTATION_CODE.fullmatch(text) else "(non-standard value)"


def quoted_uid(value: object) -> str:
    """A UID (a transfer syntax, say) as a reason may repeat it; anything else is described."""
    text = str(value).strip()
    return text if len(text) <= 64 and UID_STRING.fullmatch(text) else "(non-standard value)"


class UnreadableImageError(ValueError):
    """The input cannot be turned into a chest X-ray image (bad file, no pixels, absurd size...)."""


class ImageAccessError(UnreadableImageError):
    """The file could not be read from its storage (permission denied, an I/O error, a stale network
    mount, no file handles left): the host's problem, not the image's. Still an `UnreadableImageError`
    for callers of `PneumoniaDetector`; the worker retries it instead of failing the instance."""


class InvertedImageError(UnreadableImageError):
    """The pixels look like a chest radiograph shown the wrong way round (bright lungs): an inverted
    MONOCHROME2 image or a mislabelled MONOCHROME1 one. Scored as it is, an inverted normal reads like
    pneumonia (`models.polarity`)."""


class RotatedImageError(UnreadableImageError):
    """The pixels look like a chest radiograph stored turned by 90 or 180 degrees (a portable plate read
    sideways, no Patient Orientation to turn it by). Scored as they are, sideways test images lost about
    10 points of AUC and 14-23% of pneumonia fell under 0.5 (`models.polarity`)."""


class ModelIntegrityError(RuntimeError):
    """The ONNX file does not match its model card (wrong sha256, missing card)."""


class ExecutionProviderError(RuntimeError):
    """A required onnxruntime execution provider (CUDA) is not active in this process.

    onnxruntime falls back to the CPU by itself when CUDA cannot start (no GPU, a driver or
    cuDNN mismatch, the CPU-only wheel). A GPU deployment asks for CUDA explicitly so that this
    shows as an error at start-up instead of a worker running several times slower unnoticed.
    """
