import pytest

from trsae import timing


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", c)
    timing.reset()
    yield c
    timing.reset()


def test_time_goes_to_the_innermost_phase_once(clock):
    with timing.phase("evaluate"):
        clock.t += 2
        with timing.phase("lm forward"):
            clock.t += 5
        clock.t += 1
        with timing.phase("lm forward"):
            clock.t += 3
    with timing.phase("train", "TopK"):
        clock.t += 7
    with timing.phase("lm forward"):
        clock.t += 4
    assert timing.totals() == {("evaluate", ""): (3.0, 1), ("evaluate > lm forward", ""): (8.0, 2),
                               ("train", "TopK"): (7.0, 1), ("lm forward", ""): (4.0, 1)}


def test_an_exception_still_charges_the_phase(clock):
    with pytest.raises(ValueError):
        with timing.phase("harvest"):
            clock.t += 2
            raise ValueError
    assert timing.totals() == {("harvest", ""): (2.0, 1)}


def test_write_replaces_one_notebooks_rows_and_adds_the_unclaimed_time(clock, tmp_path):
    path = tmp_path / "profile_times.csv"
    with timing.phase("train", "TopK"):
        clock.t += 6
    timing.write(path, "01_baseline", wall_s=10.0)
    timing.reset()
    with timing.phase("train", "TRSAE-TopK"):
        clock.t += 2
    timing.write(path, "02_temporal")
    timing.reset()
    with timing.phase("harvest"):
        clock.t += 1
    rows = timing.write(path, "01_baseline", wall_s=1.5)
    assert timing.read(path) == rows
    got = {(r["notebook"], r["phase"], r["detail"]): r["seconds"] for r in rows}
    assert got == {("02_temporal", "train", "TRSAE-TopK"): 2.0, ("01_baseline", "harvest", ""): 1.0,
                   ("01_baseline", "other", ""): 0.5}
    table = timing.summary(rows)
    assert table.splitlines()[0] == "| phase | 01_baseline | 02_temporal | total |"
    assert "| **total** | 2 | 2 | 4 |" in table


def test_the_readme_section_is_replaced_between_its_markers(tmp_path):
    rows = [{"notebook": "01", "phase": "train", "detail": "", "seconds": 5.0, "calls": 1},
            {"notebook": "paper", "phase": "paper", "detail": "", "seconds": 2.0, "calls": 1}]
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\nbefore\n\n{timing.BEGIN}\nold table\n{timing.END}\n\nafter\n")
    timing.write_readme(readme, rows, "a run", "t.csv")
    timing.write_readme(readme, rows, "a run", "t.csv")  # idempotent
    text = readme.read_text()
    assert text.startswith("# T\n\nbefore\n\n" + timing.BEGIN) and text.endswith(timing.END + "\n\nafter\n")
    assert "old table" not in text and "7 s in all" in text and "| train | 5 | 0 | 5 |" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="timing markers"):
        timing.write_readme(readme, rows, "a run", "t.csv")
