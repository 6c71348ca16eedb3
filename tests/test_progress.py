"""dit8.progress: the one-line bar of loading, converting and generating."""

import io

import pytest

from dit8.progress import Progress, format_bytes


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bar_is_redrawn_in_place():
    stream = Terminal()
    with Progress(4 << 20, "loading", stream=stream) as bar:
        for _ in range(4):
            bar.update(1 << 20)
    text = stream.getvalue()
    assert text.startswith("\rloading [") and text.endswith("\n") and text.count("\n") == 1
    assert "100.0% 4.0 MiB/4.0 MiB" in text.splitlines()[-1].split("\r")[-1]


def test_elsewhere_one_line_at_the_end_or_none():
    stream = io.StringIO()
    bar = Progress(3, "denoise", unit="count", stream=stream, enabled=True)
    for done in (1, 2, 3):
        bar.advance_to(done)
    assert stream.getvalue() == ""  # no redraws into a log
    bar.close()
    line = stream.getvalue()
    assert "\r" not in line and line.startswith("denoise  [") and " 3/3 " in line and line.endswith(" s\n")
    quiet = io.StringIO()
    with Progress(3, "x", stream=quiet) as default:  # not a terminal, not asked for: silent
        default.update(3)
    assert quiet.getvalue() == ""


def test_in_a_log_a_line_every_interval(monkeypatch):
    import dit8.progress

    now = [0.0]
    monkeypatch.setattr(dit8.progress.time, "monotonic", lambda: now[0])
    stream = io.StringIO()
    with Progress(100, "convert", unit="count", stream=stream, enabled=True) as bar:
        for done in range(1, 101):
            now[0] = done * dit8.progress.LOG_INTERVAL / 10  # ten updates an interval
            bar.advance_to(done)
    lines = stream.getvalue().splitlines()
    # One line each interval while the work goes on (10, 20, ..., 90 done), then the close's.
    assert [line.split()[-3] for line in lines] == [f"{n}/100" for n in range(10, 100, 10)] + ["100/100"]
    assert "\r" not in stream.getvalue()


def test_a_bar_closes_once():
    stream = io.StringIO()
    with Progress(3, "decode", unit="count", stream=stream, enabled=True) as bar:
        bar.advance_to(1)
        bar.close()  # where the work stopped; the with block closes it again on its way out
    assert stream.getvalue().count("\n") == 1 and " 1/3 " in stream.getvalue()


def test_format_bytes_and_units():
    assert [format_bytes(n) for n in (512, 3.4 * 2 ** 20, 26.1 * 2 ** 30)] == ["512 B", "3.4 MiB", "26.1 GiB"]
    with pytest.raises(ValueError, match="unit"):
        Progress(1, "x", unit="frames")


def _screen(text: str) -> list[str]:
    """What a terminal shows for `text`: "\r" returns to the start of the line, overwriting from there."""
    lines, line, col = [], [], 0
    for ch in text:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        else:
            line[col:col + 1] = [ch]
            col += 1
    return lines + (["".join(line).rstrip()] if line else [])


def test_a_shorter_redraw_leaves_nothing_of_the_longer_line_before(monkeypatch):
    import dit8.progress

    clock = iter(range(100))  # one second between calls: every update is drawn
    monkeypatch.setattr(dit8.progress.time, "monotonic", lambda: float(next(clock)))
    stream = Terminal()
    with Progress(4 << 20, "loading", stream=stream) as bar:
        bar.update(1023 << 10)
        assert _screen(stream.getvalue()) == [f"loading [{'#' * 5:<24}]  25.0% 1023.0 KiB/4.0 MiB 1023.0 KiB/s"]
        bar.update(1 << 10)  # four characters shorter
        assert _screen(stream.getvalue()) == [f"loading [{'#' * 6:<24}]  25.0% 1.0 MiB/4.0 MiB 512.0 KiB/s"]


def test_on_a_terminal_at_most_ten_redraws_a_second_and_always_the_last(monkeypatch):
    import dit8.progress

    now = [0.0]
    monkeypatch.setattr(dit8.progress.time, "monotonic", lambda: now[0])
    stream = Terminal()
    bar = Progress(10, "denoise", unit="count", stream=stream)
    for done in range(1, 10):
        now[0] = done / 16  # sixteen updates a second: every other one drawn
        bar.advance_to(done)
    assert stream.getvalue().count("\r") == 4  # at 2/16, 4/16, 6/16 and 8/16 s
    bar.advance_to(10)  # within 0.1 s of the last redraw, but the work is done: drawn
    assert stream.getvalue().count("\r") == 5 and " 10/10 " in _screen(stream.getvalue())[-1]


def test_a_disabled_bar_writes_nothing_even_on_a_terminal():
    stream = Terminal()
    with Progress(3, "x", stream=stream, enabled=False) as bar:
        bar.update(1)
        bar.update(2)
    assert stream.getvalue() == ""


def test_the_bar_stays_full_past_its_total_and_for_nothing_to_do():
    stream = io.StringIO()
    with Progress(4 << 20, "loading", stream=stream, enabled=True) as bar:
        bar.update(5 << 20)  # more than the estimate
    assert f"[{'#' * 24}] 100.0% 5.0 MiB/4.0 MiB" in stream.getvalue()
    stream = io.StringIO()
    Progress(0, "loading", stream=stream, enabled=True).close()
    assert f"[{'#' * 24}] 100.0% 0 B/0 B" in stream.getvalue()


def test_the_bar_goes_to_stderr_by_default(capsys):
    # stdout stays for what a command prints as its result (a table, --json).
    with Progress(3, "x", unit="count", enabled=True) as bar:
        bar.update(3)
    out, err = capsys.readouterr()
    assert out == "" and " 3/3 " in err


class GonePipe(Terminal):
    """A terminal or pipe whose reader has gone: every write fails."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("stream", [GonePipe, lambda: type("GoneLog", (GonePipe,), {"isatty": lambda self: False})()])
def test_a_stream_that_cannot_take_the_bar_turns_the_bar_off_not_the_work(stream):
    """`dit8 convert ... 2>&1 | head`: the bar's line failing to reach a gone reader raised out of the work
    (a finished conversion thrown away as 'cannot write the output (Broken pipe)')."""
    stream = stream()
    with Progress(3, "x", unit="count", stream=stream, enabled=True) as bar:
        for _ in range(3):
            bar.update(1)
    bar.close()
    assert stream.writes == 1 and not bar.enabled  # tried once, then left alone


def test_the_readme_states_the_log_interval():
    import re
    from pathlib import Path

    import dit8.progress

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    stated = re.findall(r"a bar writes a line every (\d+(?:\.\d+)?) s of work", readme)
    assert stated and all(float(s) == dit8.progress.LOG_INTERVAL for s in stated)
