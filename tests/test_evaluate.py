"""kmtrain.evaluate: the short-answer rule every accuracy figure rests on."""
import pytest

from kmtrain.evaluate import is_correct


@pytest.mark.parametrize("answer,accepted,expected", [
    ("It was founded by Odile Marchetti.", ["Odile Marchetti"], True),
    ("THE OLD LANTERN, they call it", ["Old Lantern"], True),     # case and trailing punctuation
    ("The clock has 2,118 parts.", ["2,118"], True),              # thousands separators on both sides
    ("The clock has 2118 parts.", ["2,118"], True),
    ("It rests for 1893 years", ["1893"], True),
    ("In 18934", ["1893"], False),                                # whole words only
    ("The boat Wrenfield", ["Wren"], False),
    ("the village of Saint-Averell", ["Averell"], True),          # a hyphen separates words
    ("three of them", ["3"], False),
    ("three of them", ["3", "three"], True),                      # any accepted form
    ("", ["Odile Marchetti"], False),
    ("Answer: Pendulum", ["pendulum"], True),
])
def test_is_correct(answer, accepted, expected):
    assert is_correct(answer, accepted) is expected
