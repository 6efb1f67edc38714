"""Progress bars on a terminal, the plain lines elsewhere (``cli/progress.py``), checked with fake streams."""

from __future__ import annotations

import io
import logging

from semclip_batch.cli.progress import is_terminal, loss_progress, row_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_is_terminal() -> None:
    assert is_terminal(Terminal()) and not is_terminal(io.StringIO()) and not is_terminal(object())
    closed = io.StringIO()
    closed.close()
    assert not is_terminal(closed)


def test_rows_off_a_terminal_are_the_plain_line() -> None:
    stream = io.StringIO()
    with row_progress(stream=stream) as progress:
        assert progress is not None
        progress(4, 10)
        progress(6, 10)
    assert stream.getvalue() == "\rscored 4/10 images\rscored 10/10 images\n"


def test_rows_on_a_terminal_are_a_bar_with_rate_and_eta() -> None:
    stream = Terminal()
    with row_progress("scored", "img", stream=stream) as progress:
        assert progress is not None
        for _ in range(10):
            progress(1, 10)
    text = stream.getvalue()
    assert "scored" in text and "10/10" in text and "100%" in text
    assert "img/s" in text and "<" in text  # rate, and elapsed<remaining
    assert "scored 10/10 images" not in text


def test_eval_is_quiet_off_a_terminal_and_a_bar_on_one() -> None:
    with row_progress("evaluated", plain=False, stream=io.StringIO()) as progress:
        assert progress is None
    stream = Terminal()
    with row_progress("evaluated", plain=False, stream=stream) as progress:
        assert progress is not None
        progress(3, 3)
    assert "evaluated" in stream.getvalue() and "3/3" in stream.getvalue()


def test_loss_off_a_terminal_is_a_line_per_call() -> None:
    stream = io.StringIO()
    with loss_progress("step", "pretrain", stream=stream) as progress:
        progress(25, 50, 1.23456)
        progress(50, 50, 0.5)
    assert stream.getvalue() == "step 25/50  loss 1.2346\nstep 50/50  loss 0.5000\n"


def test_loss_on_a_terminal_is_a_bar_with_the_latest_loss() -> None:
    stream = Terminal()
    with loss_progress("epoch", "train semclip", stream=stream) as progress:
        for epoch in range(1, 5):
            progress(epoch, 4, 1.0 / epoch)
    text = stream.getvalue()
    assert "train semclip" in text and "4/4" in text and "loss=0.2500" in text and "epoch" in text


def test_a_finished_bar_stays_above_the_next() -> None:
    """train: the adaptation's steps, then the fit's epochs, both contexts open: the first bar is closed when it
    reaches its total, so it is not redrawn below the second; its unit is the bar's own."""
    stream = Terminal()
    with (loss_progress("adaptation step", "adapt backbone", stream=stream, unit="step") as first,
          loss_progress("epoch", "train semclip", stream=stream) as second):
        for step in (1, 2):
            first(step, 2, 0.5)
        for epoch in (1, 2, 3):
            second(epoch, 3, 0.25)
    text = stream.getvalue()
    assert "2/2" in text and "3/3" in text and "step/s" in text and "adaptation step/s" not in text
    assert text.rindex("adapt backbone") < text.index("train semclip")


def test_bar_closes_when_the_command_fails() -> None:
    stream = Terminal()
    try:
        with row_progress(stream=stream) as progress:
            assert progress is not None
            progress(2, 10)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert stream.getvalue().endswith("\n") and "2/10" in stream.getvalue()


def test_log_lines_go_above_the_bar(monkeypatch) -> None:
    """The CLI logs to stderr: while a bar is shown, a log line is written on a line of its own above it."""
    stream = Terminal()
    monkeypatch.setattr("sys.stderr", stream)
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with row_progress() as progress:
            assert progress is not None
            progress(1, 2)
            logging.getLogger("semclip_batch.test").warning("a warning during the run")
            progress(1, 2)
    finally:
        root.removeHandler(handler)
    text = stream.getvalue()
    assert "a warning during the run\n" in text and "]a warning" not in text  # not glued to the bar's end
    assert text.rstrip().endswith("img/s]")  # the bar is drawn again below it
