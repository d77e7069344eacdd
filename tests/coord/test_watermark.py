"""Per-entity watermarks: a change applies only when its token is strictly newer."""

from pkg.coord import Watermarks


def test_first_token_applies_and_later_lower_tokens_do_not() -> None:
    marks: Watermarks[str] = Watermarks()
    assert marks.advance("n1", (5, 1))
    assert not marks.advance("n1", (5, 1)), "an equal token is a duplicate"
    assert not marks.advance("n1", (4, 99)), "a lower fence loses whatever its sequence"
    assert marks.advance("n1", (5, 2))
    assert marks.advance("n1", (6, 0)), "a higher fence wins even with a lower sequence"
    assert marks.get("n1") == (6, 0)


def test_entities_are_independent_and_can_be_forgotten() -> None:
    marks: Watermarks[str] = Watermarks()
    marks.advance("a", (9, 9))
    assert marks.is_newer("b", (1, 0))
    marks.forget("a")
    assert marks.advance("a", (1, 0))
    assert len(marks) == 1
