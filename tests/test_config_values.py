"""List-valued config fields read the same whichever way they were typed."""

from vgg_jax.config_values import string_list


def test_comma_separated_and_tuple_spellings_agree():
    assert string_list(("runs/a,runs/b",)) == ["runs/a", "runs/b"]
    assert string_list(("runs/a", "runs/b")) == ["runs/a", "runs/b"]
    assert string_list("runs/a, runs/b") == ["runs/a", "runs/b"]
    assert string_list(()) == []
    assert string_list(("",)) == []
