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
