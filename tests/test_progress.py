"""fxopt/progress.py: who sees progress (the CLI, a terminal, FXOPT_PROGRESS) and what a stage or loop prints."""

from __future__ import annotations

import io

import pytest

from fxopt import progress


class _TTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def stderr(monkeypatch):
    """Progress written to a StringIO (not a terminal), library default, loops shown from the first item."""
    stream = io.StringIO()
    monkeypatch.setattr(progress, "_stream", lambda: stream)
    monkeypatch.setattr(progress, "LOOP_DELAY_S", 0.0)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    monkeypatch.delenv("FXOPT_PROGRESS", raising=False)
    progress.configure(enabled=None)
    yield stream
    progress.configure(enabled=None)


def test_a_library_call_off_a_terminal_prints_nothing(stderr):
    with progress.stage("capturing"):
        pass
    assert list(progress.progress(range(5), desc="rows")) == list(range(5))
    assert stderr.getvalue() == ""


def test_the_cli_shows_stages_and_loops_on_a_pipe(stderr):
    progress.configure(enabled=True)  # what the CLI does without --quiet
    with progress.stage("capturing gpt2-tiny"):
        pass
    assert list(progress.progress(range(3), desc="timing rows")) == [0, 1, 2]
    out = stderr.getvalue()
    assert "fxopt: capturing gpt2-tiny... done in" in out
    assert "fxopt: timing rows: 1/3 (33%)" in out and "fxopt: timing rows: 3/3 done in" in out


def test_a_failing_stage_says_so(stderr):
    progress.configure(enabled=True)
    with pytest.raises(ValueError), progress.stage("building"):
        raise ValueError("no")
    assert "fxopt: building... failed after" in stderr.getvalue()


def test_quiet_and_the_variable_win(stderr, monkeypatch):
    progress.configure(enabled=False)  # --quiet
    monkeypatch.setenv("FXOPT_PROGRESS", "1")
    with progress.stage("capturing"):
        pass
    progress.note("ignored")
    assert stderr.getvalue() == ""
    progress.configure(enabled=None)  # the library default, forced on by the variable
    with progress.stage("capturing"):
        pass
    assert "fxopt: capturing... done in" in stderr.getvalue()
    monkeypatch.setenv("FXOPT_PROGRESS", "0")
    tty = _TTY()
    monkeypatch.setattr(progress, "_stream", lambda: tty)
    with progress.stage("capturing"):
        pass
    assert tty.getvalue() == ""  # off even on a terminal
