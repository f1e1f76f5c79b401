"""The offline check's report: damage, and what could not be checked, told apart."""

from __future__ import annotations

from blockvirt.storage.check import Report


def test_unchecked_is_not_damage_but_not_clean() -> None:
    r = Report(volumes=2)
    r.unchecked.append("pool far: cannot be checked: no monitor answered")
    assert r.damaged  # exit 1: nothing can be said of that pool
    assert r.to_dict()["ok"] is False and r.to_dict()["damage"] == []
    lines = r.text().splitlines()
    assert "NOT CHECKED: pool far: cannot be checked: no monitor answered" in lines
    assert lines[-1] == "not all checked" and not any(x.startswith("DAMAGE") for x in lines)


def test_damage_wins_the_verdict() -> None:
    r = Report()
    r.unchecked.append("pool far: cannot be checked")
    r.damage.append("volume v: its RBD image is missing")
    assert r.text().splitlines()[-1] == "damaged"


def test_clean() -> None:
    r = Report()
    assert not r.damaged and r.text().splitlines()[-1] == "clean"
    r.leaks.append("x")
    assert not r.damaged and r.text().splitlines()[-1] == "clean (with leaks)"
