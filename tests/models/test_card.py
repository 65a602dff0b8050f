import pytest

from models.card import ModelCard, Stratum, validate_strata

STRATA = (Stratum("likely_normal", 0.0, 0.2), Stratum("indeterminate", 0.2, 0.8), Stratum("high_suspicion", 0.8, 1.0))


def make_card(**overrides) -> ModelCard:
    fields = dict(name="m", version="1", sha256="0" * 64, labels=("Normal", "Pneumonia"), preprocessing="p",
                  input_shape=(-1, 3, 224, 224), temperature=1.5, threshold=0.5, strata=STRATA)
    return ModelCard(**{**fields, **overrides})


@pytest.mark.parametrize("p,expected", [(0.0, "likely_normal"), (0.1999, "likely_normal"), (0.2, "indeterminate"),
                                        (0.7999, "indeterminate"), (0.8, "high_suspicion"), (1.0, "high_suspicion")])
def test_stratum_boundaries_are_half_open(p, expected):
    assert make_card().stratum_for(p) == expected


def test_round_trip_keeps_unknown_fields(tmp_path):
    card = make_card(extra={"data": {"md5": "abc"}})
    card.save(tmp_path / "c.json")
    loaded = ModelCard.load(tmp_path / "c.json")
    assert loaded == card and loaded.extra["data"]["md5"] == "abc"


@pytest.mark.parametrize("strata", [
    (Stratum("a", 0.0, 0.4), Stratum("b", 0.5, 1.0)),
    (Stratum("a", 0.1, 1.0),),
    (),
    # cut-points typed as percentages: they met end to end, and every study was likely_normal (ROUTINE)
    (Stratum("a", 0.0, 46.6), Stratum("b", 46.6, 53.5), Stratum("c", 53.5, 1.0)),
    (Stratum("a", 0.0, 0.5), Stratum("b", 0.5, 1.5), Stratum("c", 1.5, 1.0)),  # no URGENT ever
    (Stratum("a", 0.0, -0.2), Stratum("b", -0.2, 1.0)),
    (Stratum("a", 0.0, float("nan")), Stratum("b", float("nan"), 1.0)),
])
def test_strata_must_tile_the_unit_interval(strata):
    with pytest.raises(ValueError):
        validate_strata(strata)


def test_an_empty_middle_stratum_is_a_tiling():
    """Validation's targets can put both cut-points at one value (the released card's indeterminate)."""
    validate_strata((Stratum("a", 0.0, 0.133), Stratum("b", 0.133, 0.133), Stratum("c", 0.133, 1.0)))


def strict_loads(text: str):
    """json.loads that refuses NaN/Infinity, as JSON.parse and other strict readers do."""
    import json

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_the_card_is_strict_json_even_with_an_empty_stratum(tmp_path):
    """An empty band has no PPV (NaN in memory); the card must still parse in any JSON reader
    (JavaScript's JSON.parse, Go, jq --strict), so it is written as null."""
    import numpy as np

    card = make_card(extra={"metrics": {"test_strata": {"indeterminate": {"count": 0, "ppv": float("nan"),
                                                                          "npv": np.float64("nan")},
                                                        "high_suspicion": {"count": 3, "ppv": np.float32(0.5)}}}})
    card.save(tmp_path / "c.json")
    data = strict_loads((tmp_path / "c.json").read_text())
    assert data["metrics"]["test_strata"]["indeterminate"] == {"count": 0, "ppv": None, "npv": None}
    assert data["metrics"]["test_strata"]["high_suspicion"]["ppv"] == 0.5


def test_the_released_card_is_strict_json():
    from models.card import card_path_for, default_model_path

    strict_loads(card_path_for(default_model_path()).read_text())


def test_a_card_edited_after_it_was_written_is_refused(tmp_path):
    """A hand-moved cut-point passed every plausibility check and changed which studies read URGENT, with no
    trace in the results (they record the ONNX sha256 only)."""
    import json

    from models.detector import load_card
    from models.errors import ModelIntegrityError

    path = tmp_path / "m.card.json"
    make_card().save(path)
    assert ModelCard.load(path) == make_card()
    data = json.loads(path.read_text())
    data["strata"][1]["upper"] = data["strata"][2]["lower"] = 0.5  # high_suspicion from 0.5, plausible
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="edited after it was written"):
        ModelCard.load(path)
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(ModelIntegrityError, match="edited after it was written"):
        load_card(tmp_path / "m.onnx", verify_sha256=False)
    del data["decision_sha256"]  # a card written before the digest: read as before
    path.write_text(json.dumps(data))
    assert ModelCard.load(path).strata[2].lower == 0.5


def test_the_decision_digest_is_the_same_through_saves_and_covers_decisions_only(tmp_path):
    card = make_card()
    card.save(tmp_path / "a.json")
    ModelCard.load(tmp_path / "a.json").save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    from dataclasses import replace

    assert replace(card, threshold=0.31).decision_sha256 != card.decision_sha256
    assert replace(card, metrics={"test_auc": 0.5}).decision_sha256 == card.decision_sha256  # figures are not decisions


def test_the_released_card_carries_its_decision_digest():
    import json

    from models.card import card_path_for, default_model_path

    path = card_path_for(default_model_path())
    assert json.loads(path.read_text())["decision_sha256"] == ModelCard.load(path).decision_sha256


def test_a_card_rewritten_by_another_json_writer_is_not_taken_for_an_edit(tmp_path):
    """jq and JavaScript write 1.0 as 1 and 0.0 as 0: a site adding a note to its copy of the card was refused
    as an edit. A stratum's description is words, not a decision."""
    import json

    path = tmp_path / "m.card.json"
    make_card(temperature=1.0, strata=(Stratum("likely_normal", 0.0, 0.2), Stratum("indeterminate", 0.2, 0.8),
                                       Stratum("high_suspicion", 0.8, 1.0))).save(path)
    data = json.loads(path.read_text())
    data["temperature"], data["strata"][0]["lower"], data["strata"][2]["upper"] = 1, 0, 1
    data["strata"][1]["description"] = "reworded"
    data["note"] = "site copy"
    path.write_text(json.dumps(data))
    assert ModelCard.load(path).extra["note"] == "site copy"
