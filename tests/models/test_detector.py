"""PneumoniaDetector on every supported input kind, against the released (packaged) model."""

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.card import ModelCard, card_path_for, default_model_path
from models.detector import (
    PneumoniaDetector,
    choose_providers,
    ensure_provider_active,
    load_cuda_libraries,
    session_providers,
)
from models.errors import (ExecutionProviderError, InvertedImageError, ModelIntegrityError, RotatedImageError,
                           UnreadableImageError)
from worker.samples import make_cxr_dataset, save


@pytest.fixture(scope="module")
def detector():
    return PneumoniaDetector()


@pytest.fixture(scope="module")
def sample(pneumoniamnist):
    return pneumoniamnist["test_images"][20]


def pneumonia_p(result: dict) -> float:
    return result["probabilities"]["Pneumonia"]


def test_result_has_the_original_api_shape(detector, sample):
    result = detector.predict(sample)
    assert set(result) == {"prediction", "confidence", "probabilities", "clinical_note", "stratum"}
    assert result["prediction"] in ("Normal", "Pneumonia")
    assert result["stratum"] in ("likely_normal", "indeterminate", "high_suspicion")
    assert abs(sum(result["probabilities"].values()) - 1) < 1e-9
    p = result["probabilities"]["Pneumonia"]
    assert result["prediction"] == ("Pneumonia" if p >= detector.card.threshold else "Normal")
    assert result["confidence"] == result["probabilities"][result["prediction"]]
    assert result["stratum"] == detector.card.stratum_for(p)


def test_a_note_says_which_call_it_follows_when_prediction_and_stratum_differ(detector):
    """The card's high-suspicion cut (validation-chosen for triage) lies below the 0.5 threshold of the
    binary prediction, so some results read "Normal" in the high-suspicion band: the note must not
    contradict the prediction without saying so."""
    high = next(s for s in detector.card.strata if s.name == "high_suspicion")
    assert high.lower < detector.card.threshold, "the released card has such a band"
    between = detector.describe((high.lower + detector.card.threshold) / 2)
    assert between["prediction"] == "Normal" and between["stratum"] == "high_suspicion"
    assert between["clinical_note"].startswith("High suspicion of pneumonia")
    assert f"below the {detector.card.threshold:g} threshold" in between["clinical_note"]
    assert "triage follows the stratum" in between["clinical_note"]
    agreeing = detector.describe(0.99)
    assert agreeing["prediction"] == "Pneumonia" and "threshold" not in agreeing["clinical_note"]


def test_files_of_every_kind_agree_with_the_array(detector, sample, tmp_path):
    Image.fromarray(sample).resize((504, 504), Image.NEAREST).save(tmp_path / "x.png")
    Image.fromarray(sample.astype(np.uint16) * 257).save(tmp_path / "x16.png")
    Image.fromarray(sample).resize((512, 512), Image.NEAREST).save(tmp_path / "x.jpg", quality=95)
    save(make_cxr_dataset(sample, size=(1024, 1024), photometric="MONOCHROME1"), tmp_path / "x.dcm")
    reference = pneumonia_p(detector.predict(sample))
    assert pneumonia_p(detector.predict(tmp_path / "x.png")) == pytest.approx(reference, abs=1e-6)
    assert pneumonia_p(detector.predict(str(tmp_path / "x16.png"))) == pytest.approx(reference, abs=1e-6)
    assert pneumonia_p(detector.predict(tmp_path / "x.dcm")) == pytest.approx(reference, abs=2e-2)
    assert pneumonia_p(detector.predict(tmp_path / "x.jpg")) == pytest.approx(reference, abs=5e-2)


def test_batch_equals_single(detector, pneumoniamnist):
    images = list(pneumoniamnist["test_images"][:5])
    batch = [pneumonia_p(r) for r in detector.predict_batch(images)]
    single = [pneumonia_p(detector.predict(i)) for i in images]
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_a_batch_longer_than_a_chunk_is_scored_in_order_and_names_a_bad_input_by_its_place(detector, pneumoniamnist):
    """The batch is read and scored BATCH_CHUNK at a time (the whole list at once held ~7 MB an image): the
    results keep the input order across chunks, and a bad input in a later chunk is named by its place."""
    from models.detector import BATCH_CHUNK

    images = list(pneumoniamnist["test_images"][: 2 * BATCH_CHUNK + 3])
    batch = [pneumonia_p(r) for r in detector.predict_batch(images)]
    single = [pneumonia_p(detector.predict(i)) for i in images]
    np.testing.assert_allclose(batch, single, atol=1e-5)
    images[2 * BATCH_CHUNK + 1] = images[0][:20, :20]
    with pytest.raises(UnreadableImageError, match=rf"^input {2 * BATCH_CHUNK + 2} of {len(images)}: "):
        detector.predict_batch(images)


def test_model_separates_classes(detector, pneumoniamnist):
    """The released model must rank pneumonia above normal on a test sample (AUC well above chance)."""
    from sklearn.metrics import roc_auc_score

    images, labels = pneumoniamnist["test_images"][:120], pneumoniamnist["test_labels"][:120, 0]
    probabilities = [pneumonia_p(r) for r in detector.predict_batch(list(images))]
    assert roc_auc_score(labels, probabilities) > 0.85


def test_unreadable_file_raises_clear_error(detector, tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(UnreadableImageError, match="not a readable image"):
        detector.predict(tmp_path / "junk.png")
    with pytest.raises(FileNotFoundError):
        detector.predict(tmp_path / "missing.png")
    with pytest.raises(UnreadableImageError):
        detector.predict(12345)


def test_inputs_that_are_no_radiograph_raise_unreadable_image_error(detector, sample, tmp_path):
    """Every refusal is an UnreadableImageError with a reason, whatever the input kind."""
    big = np.asarray(Image.fromarray(sample).resize((2048, 2048), Image.BILINEAR))
    Image.fromarray(big[1009:1039, :]).save(tmp_path / "strip.png")  # 30 x 2048: its centre square is a sliver
    Image.fromarray(sample[:20, :20]).save(tmp_path / "small.png")
    bomb = tmp_path / "bomb.png"  # a 1x1 PNG whose header claims 20000 x 20000 pixels
    Image.new("L", (1, 1)).save(bomb)
    ihdr = bytearray(bomb.read_bytes())
    ihdr[16:24] = struct.pack(">II", 20000, 20000)
    ihdr[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr[12:29])))
    bomb.write_bytes(bytes(ihdr))
    cases = [(tmp_path / "strip.png", "aspect ratio"), (tmp_path / "small.png", "smaller than"),
             (bomb, "not a readable image"), (big[:, :300], "aspect ratio"), (sample[:, :, None, None], "2-D")]
    for image, reason in cases:
        with pytest.raises(UnreadableImageError, match=reason):
            detector.predict(image)


def test_a_16_bit_png_holding_unscaled_12_bit_values_is_refused_not_misread(detector, sample, tmp_path):
    """Read over 65535, 12-bit values are nearly black (test AUC 0.96 -> 0.22): a clear error, not a score."""
    from PIL import Image

    raw = tmp_path / "raw12.png"
    Image.fromarray(sample.astype(np.uint16) * 16).save(raw)  # 0..4080: the low 12 bits only
    with pytest.raises(UnreadableImageError, match="16-bit image uses only its low 12 bits"):
        detector.predict(str(raw))
    full = tmp_path / "full16.png"
    Image.fromarray(sample.astype(np.uint16) * 257).save(full)  # the same picture, full range
    assert detector.predict(str(full))["stratum"]


def test_raw_14_bit_values_in_a_16_bit_array_are_refused_not_read_at_a_quarter_brightness(detector, sample):
    """A DR detector's 14-bit pixel_array passed as an array (or a raw 16-bit PNG export) was accepted and
    read at a quarter of its brightness: over 120 test images every study was high_suspicion (specificity
    0.91 -> 0.26). Full-range data whose brightest pixel is above a quarter of 65535 is still scored."""
    raw14 = sample.astype(np.uint16) * 64 + 63  # 63..16383
    with pytest.raises(UnreadableImageError, match="16-bit image uses only its low 14 bits"):
        detector.predict(raw14)
    dim = np.rint(sample / sample.max() * 20000).astype(np.uint16)  # up to 20000: a dim but plausible export
    assert detector.predict(dim)["stratum"]


@pytest.mark.parametrize("bits", [12, 14])
def test_unscaled_values_lifted_by_an_offset_are_refused_not_read_as_a_grey_band(detector, sample, tmp_path, bits):
    """12-bit data + 32768 (a signed-to-unsigned export slip) uses the top bit, so the low-bits rule let it
    through: a thin grey band, every one of 60 test normals read high_suspicion, with no error."""
    from PIL import Image

    raw = sample.astype(np.uint16) * (2 ** (bits - 8)) + 32768
    with pytest.raises(UnreadableImageError, match=r"16-bit image spans only \d+ of its 65536 levels"):
        detector.predict(raw)
    png = tmp_path / "offset.png"
    Image.fromarray(raw).save(png)
    with pytest.raises(UnreadableImageError, match="an offset or unscaled export"):
        detector.predict(str(png))
    spread = (sample.astype(np.uint16) * 150 + 20000)  # a wide band, not full range: still scored
    assert detector.predict(spread)["stratum"]


def test_a_batch_names_the_input_it_refuses(detector, sample):
    with pytest.raises(UnreadableImageError, match=r"^input 2 of 3: image side 20 is smaller"):
        detector.predict_batch([sample, sample[:20, :20], sample])
    with pytest.raises(FileNotFoundError, match=r"^input 3 of 3: no such image file"):  # a missing path too
        detector.predict_batch([sample, sample, "missing.png"])


def test_a_batch_may_be_any_iterable_of_inputs(detector, pneumoniamnist):
    """Chunking the batch (BATCH_CHUNK) took its len() and slices first: `predict_batch(folder.glob("*.dcm"))`,
    which scored every file before, raised "TypeError: object of type 'generator' has no len()"."""
    images = list(pneumoniamnist["test_images"][:3])
    expected = [pneumonia_p(r) for r in detector.predict_batch(images)]
    assert [pneumonia_p(r) for r in detector.predict_batch(image for image in images)] == expected
    assert [pneumonia_p(r) for r in detector.predict_batch(dict(enumerate(images)).values())] == expected
    with pytest.raises(UnreadableImageError, match=r"^input 2 of 3: image side 20 is smaller"):
        detector.predict_batch(iter([images[0], images[1][:20, :20], images[2]]))


def test_a_blank_picture_is_refused_as_a_blank_dicom_is(detector, sample, tmp_path):
    """An all-black PNG was scored 0.73 pneumonia; a DICOM blank as displayed was already refused."""
    Image.fromarray(np.zeros((512, 512), np.uint8)).save(tmp_path / "black.png")
    grey = np.full((3000, 2000), 30000, np.uint16)
    grey[:5, :5] = 65535  # a few pixels of another level do not make a picture
    for image, what in ((str(tmp_path / "black.png"), "black"), (grey, "grey level 117/255")):
        with pytest.raises(UnreadableImageError, match=f"image is blank as displayed .* {what}"):
            detector.predict(image)
    bordered = np.zeros((1024, 1024), np.uint8)  # a picture inside a wide black border is not blank
    bordered[312:712, 312:712] = np.asarray(Image.fromarray(sample).resize((400, 400)))
    assert detector.predict(bordered)["stratum"]
    sparse = np.rint(np.asarray(Image.fromarray(sample).resize((2048, 2048))) / 255 * 14000 + 2000).astype(np.uint16)
    sparse[1001] = 65535  # full-range through one row only, which a grid that skips rows would miss
    assert detector.predict(sparse)["stratum"]


def test_exif_orientation_is_honoured(detector, sample, tmp_path):
    """A file stored sideways with an EXIF orientation is read as a viewer shows it."""
    upright = Image.fromarray(sample).resize((504, 504), Image.NEAREST)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif)
    upright.save(tmp_path / "upright.png")
    assert detector.predict(tmp_path / "sideways.png") == detector.predict(tmp_path / "upright.png")
    unchecked = PneumoniaDetector(polarity_check=False)  # a sideways chest is refused as turned (models.polarity)
    assert unchecked.predict(tmp_path / "sideways.png") != unchecked.predict(np.rot90(sample))
    with pytest.raises(RotatedImageError, match=r"pixels look stored turned: .* turned 90 degrees (clockwise|\(which way "
                                                 r"is unclear\))"):
        detector.predict(np.rot90(sample))  # without its EXIF, the same pixels are refused as turned


def test_a_channel_axis_of_one_is_dropped(detector, sample):
    assert detector.predict(sample[:, :, None]) == detector.predict(sample)


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs a file that open() accepts and read() refuses")
def test_a_file_that_cannot_be_read_gives_a_reason(detector):
    with pytest.raises(UnreadableImageError, match=r"could not be read \(OSError\)"):
        detector.predict("/proc/self/mem")


def test_model_not_matching_its_card_is_refused(tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(default_model_path(), model)
    card = card_path_for(default_model_path()).read_text()
    card_path_for(model).write_text(card.replace('"sha256": "', '"sha256": "0', 1))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        PneumoniaDetector(model)
    card_path_for(model).write_text(card[:500])  # truncated while being copied
    with pytest.raises(ModelIntegrityError, match="unreadable, incomplete or implausible"):
        PneumoniaDetector(model)
    card_path_for(model).write_text(card.replace('"sha256"', '"sha256_"', 1))  # a field missing
    with pytest.raises(ModelIntegrityError, match="unreadable, incomplete or implausible"):
        PneumoniaDetector(model)
    card_path_for(model).unlink()
    with pytest.raises(ModelIntegrityError, match="card missing"):
        PneumoniaDetector(model)


@pytest.mark.parametrize("edit,reason", [
    (lambda c: {**c, "temperature": -c["temperature"]}, "temperature must be a positive finite number"),
    (lambda c: {**c, "temperature": 0}, "temperature must be a positive finite number"),
    (lambda c: {**c, "threshold": 1.5}, "threshold must be a probability"),
    (lambda c: {**c, "labels": c["labels"][::-1]}, "labels must be"),
    (lambda c: {**c, "strata": [{**s, "name": n} for s, n in zip(c["strata"], ("high_suspicion", "indeterminate",
                                                                                 "likely_normal"))]},
     "strata must be likely_normal, indeterminate, high_suspicion from low to high"),
    (lambda c: {**c, "strata": [{**s, "name": n} for s, n in zip(c["strata"], ("low", "mid", "high"))]},
     "strata must be likely_normal"),
])
def test_a_card_edited_into_wrong_numbers_is_refused_with_its_reason(tmp_path, edit, reason):
    """The sha256 binds the card to the ONNX file, not the card's own numbers: an edited card that
    would score every study wrong (a negative temperature makes every pneumonia likely_normal) must
    stop the detector, naming what is wrong."""
    model = tmp_path / "m.onnx"
    model.symlink_to(default_model_path())
    card = json.loads(card_path_for(default_model_path()).read_text())
    card_path_for(model).write_text(json.dumps(edit(card)))
    with pytest.raises(ModelIntegrityError, match=reason):
        PneumoniaDetector(model)


def test_a_card_whose_input_shape_this_code_cannot_feed_is_refused_at_load(tmp_path, sample):
    """The card's input_shape was read but never checked: a card saying 256x256 (or one channel) loaded, and then
    every image failed at inference with a bare ValueError, recorded as the image's failure instance by
    instance, where a model that cannot be used must stop the worker at start-up (ModelIntegrityError)."""
    model = tmp_path / "m.onnx"
    model.symlink_to(default_model_path())
    card = json.loads(card_path_for(default_model_path()).read_text())
    for shape in ([-1, 3, 256, 256], [-1, 1, 224, 224], [3, 224, 224]):
        ModelCard.from_dict({**card, "input_shape": shape}).save(card_path_for(model))  # as a writer would
        with pytest.raises(ModelIntegrityError, match=r"input_shape .* differs from this code's network input "
                                                      r"\(N, 3, 224, 224\)"):
            PneumoniaDetector(model)


def shaped_network(side: int, outputs: int):
    """A real (tiny) ONNX graph of the released model's interface, image (batch, 3, side, side) ->
    logits (batch, outputs): global mean of each channel, then a fixed linear map."""
    import onnx
    from onnx import helper, numpy_helper

    weights = numpy_helper.from_array(np.tile(np.arange(outputs, dtype=np.float32), (3, 1)), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    graph = helper.make_graph(
        nodes, "shaped", [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", 3, side, side])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", outputs])], initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("side,outputs,reason", [
    (256, 2, r"graph input image \['batch', 3, 256, 256\] differs from its card's input_shape \[-1, 3, 224, 224\]"),
    (224, 3, r"graph output logits \['batch', 3\] differs from its card's 2 labels"),
    (224, 2, None),  # the released interface: loads and scores
])
def test_a_graph_that_disagrees_with_its_card_is_refused_at_load(tmp_path, sample, side, outputs, reason):
    """The sha256 binds the card to one ONNX file; nothing checked that the card describes that graph's interface,
    so a card shipped with the wrong export loaded fine and every image failed at inference."""
    from models.card import sha256_of

    model = tmp_path / "m.onnx"
    model.write_bytes(shaped_network(side, outputs).SerializeToString())
    card = json.loads(card_path_for(default_model_path()).read_text())
    ModelCard.from_dict({**card, "sha256": sha256_of(model)}).save(card_path_for(model))  # carded for this graph
    if reason is None:
        assert PneumoniaDetector(model, providers=["CPUExecutionProvider"]).predict(sample)["stratum"]
        return
    with pytest.raises(ModelIntegrityError, match=reason):
        PneumoniaDetector(model, providers=["CPUExecutionProvider"])


CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def test_a_required_provider_must_be_active_and_the_error_says_why():
    ensure_provider_active(None, [CPU], [CPU])
    ensure_provider_active(CUDA, [CUDA, CPU], [CUDA, CPU])
    with pytest.raises(ExecutionProviderError, match="build offers only CPUExecutionProvider .*install the gpu extra"):
        ensure_provider_active(CUDA, [CPU], [CPU])
    with pytest.raises(ExecutionProviderError, match="could not start it"):
        ensure_provider_active(CUDA, [CPU], [CUDA, CPU])  # onnxruntime-gpu fell back: no GPU, or a driver mismatch


class OnnxruntimeGpuBuild:
    """Stands in for onnxruntime-gpu's module where only its preload hook matters: records the calls."""

    def __init__(self) -> None:
        self.preloads = 0

    def preload_dlls(self) -> None:
        self.preloads += 1


def test_cuda_libraries_are_preloaded_only_for_a_cuda_session():
    gpu_build = OnnxruntimeGpuBuild()
    assert not load_cuda_libraries(gpu_build, [CPU]) and gpu_build.preloads == 0
    assert load_cuda_libraries(gpu_build, [CUDA, CPU]) and gpu_build.preloads == 1
    assert not load_cuda_libraries(object(), [CUDA, CPU])  # onnxruntime-gpu before 1.21 has no preload_dlls


def test_cuda_sessions_run_ieee_fp32_and_the_cpu_keeps_its_defaults():
    assert session_providers([CUDA, CPU]) == [(CUDA, {"use_tf32": "0"}), CPU]
    assert session_providers([CPU]) == [CPU]


def test_the_cpu_build_never_preloads_cuda():
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA; CI installs the CPU build (the serve extra)")
    assert not load_cuda_libraries(ort, choose_providers())


def test_requiring_cuda_refuses_onnxruntimes_silent_cpu_fallback(sample):
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA; CI installs the CPU build (the serve extra)")
    assert PneumoniaDetector(providers=[CUDA]).providers == [CPU]  # what onnxruntime does by itself
    with pytest.raises(ExecutionProviderError, match="CUDAExecutionProvider required but not active"):
        PneumoniaDetector(providers=[CUDA], require_provider=CUDA)
    cpu_only = PneumoniaDetector(providers=[CPU], require_provider=CPU)
    assert cpu_only.providers == [CPU] and cpu_only.predict(sample)["stratum"]


def test_clinical_notes_agree_with_the_worklist_flags_and_claim_no_diagnosis():
    """The indeterminate note advised routine-priority review while the worklist flags that stratum PRIORITY,
    and the likely-normal note read like a finding ("no pneumonia pattern detected") for a band that holds
    some pneumonias (3 of 390 on test)."""
    from models.detector import CLINICAL_NOTES
    from worker.config import WorkerSettings

    flags = WorkerSettings().flag_map
    for stratum, note in CLINICAL_NOTES.items():
        assert "not a diagnosis" in note, stratum
        assert ("routine" in note.lower()) == (flags[stratum] == "ROUTINE"), (stratum, note, flags[stratum])
    assert "detected" not in CLINICAL_NOTES["likely_normal"] and "rule" in CLINICAL_NOTES["likely_normal"]


def test_an_inverted_radiograph_is_refused_unless_the_check_is_off(detector, pneumoniamnist, tmp_path):
    """Scored as they were, inverted test normals read like pneumonia (the clinical review: URGENT doubled);
    a JPEG, a 16-bit PNG and a MONOCHROME2 DICOM written inverted are refused, in a batch by their place."""
    normals = pneumoniamnist["test_images"][pneumoniamnist["test_labels"].ravel() == 0][:20]
    inverted = 255 - normals
    Image.fromarray(inverted[0]).resize((512, 512)).save(tmp_path / "inv.jpg", quality=95)
    Image.fromarray(inverted[0].astype(np.uint16) * 257).resize((512, 512)).save(tmp_path / "inv16.png")
    dicom = save(make_cxr_dataset(inverted[0], size=(512, 512)), tmp_path / "inv.dcm")
    for image in (inverted[0], str(tmp_path / "inv.jpg"), str(tmp_path / "inv16.png"), str(dicom)):
        with pytest.raises(InvertedImageError, match="pixels look inverted"):
            detector.predict(image)
    with pytest.raises(InvertedImageError, match=r"^input 2 of 2: pixels look inverted"):
        detector.predict_batch([normals[0], inverted[0]])
    unchecked = PneumoniaDetector(polarity_check=False)
    as_stored = np.array([pneumonia_p(r) for r in unchecked.predict_batch(list(normals))])
    flipped = np.array([pneumonia_p(r) for r in unchecked.predict_batch(list(inverted))])
    assert flipped.mean() > as_stored.mean()  # what the check keeps off the worklist
    assert unchecked.check_polarity(normals[0]) > 0  # asked directly, the check still answers
    with pytest.raises(InvertedImageError):
        unchecked.check_polarity(inverted[0])


def test_a_model_at_another_source_size_checks_polarity_on_the_shipped_size_and_scores_its_own(pneumoniamnist):
    """The template is 28x28; a model trained at 64 reduces to 64 for its input and to 28 for the check."""
    import dataclasses

    from models.preprocess import preprocess, preprocessing_id

    detector = PneumoniaDetector()
    detector.card = dataclasses.replace(detector.card, source_size=64, preprocessing=preprocessing_id(64))
    plate = np.kron(pneumoniamnist["test_images"][9].astype(np.uint16) * 257, np.ones((40, 40), np.uint16))
    assert np.array_equal(detector.checked_input(plate), preprocess(plate, 64))
    with pytest.raises(InvertedImageError):
        detector.checked_input(65535 - plate)
    assert detector.checked_input(65535 - plate, check_polarity=False).shape == (3, 224, 224)


def test_an_unusable_polarity_template_stops_the_detector_at_load(tmp_path, monkeypatch):
    broken = tmp_path / "polarity_template.json"
    broken.write_text('{"template": [[0.0]], "margin": 6, "refuse_below": -0.1, "source_size": 28}')
    monkeypatch.setattr("models.detector.POLARITY_FILE", broken)
    with pytest.raises(ModelIntegrityError, match="polarity template polarity_template.json is unreadable or unusable"):
        PneumoniaDetector()
