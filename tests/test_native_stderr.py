"""Native lines on descriptor 2 go to a log file while Python's own stderr keeps the terminal
(semclip_batch.pipeline.native_stderr), checked in a child process whose stderr is a pipe."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import os, sys
    from semclip_batch.pipeline.native_stderr import native_stderr_to, split_stderr
    log = sys.argv[1]
    if sys.argv[2] == "split":
        split_stderr()
    print("python before", file=sys.stderr)
    with native_stderr_to(log):
        os.write(2, b"[E core_worker.cc:1] native inside\\n")
        print("python inside", file=sys.stderr)
    os.write(2, b"native after\\n")
    print("python after", file=sys.stderr)
""")


def _child(tmp_path: Path, mode: str) -> tuple[str, str]:
    log = tmp_path / f"native-{mode}.err"
    done = subprocess.run([sys.executable, "-c", CHILD, str(log), mode], capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stderr, log.read_text() if log.exists() else ""


def test_native_lines_go_to_the_log_and_python_keeps_the_terminal(tmp_path):
    terminal, log = _child(tmp_path, "split")
    assert terminal.splitlines() == ["python before", "python inside", "native after", "python after"]
    assert log == "[E core_worker.cc:1] native inside\n"


def test_a_closed_descriptor_2_is_left_alone(tmp_path):
    """`2>&-`: no descriptor to move, no traceback, nothing written."""
    log = tmp_path / "native.err"
    code = ("import os, sys\nfrom semclip_batch.pipeline.native_stderr import native_stderr_to, split_stderr\n"
            "os.close(2)\nsys.stderr = None\nsplit_stderr()\n"
            f"with native_stderr_to({str(log)!r}):\n    print('inside')\nprint('after')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.splitlines() == ["inside", "after"] and not log.exists()


def test_without_the_split_nothing_moves(tmp_path):
    """Python's stderr still on descriptor 2 (a library caller): moving it would hide Python's output, so no-op."""
    terminal, log = _child(tmp_path, "nosplit")
    assert "[E core_worker.cc:1] native inside" in terminal and "python inside" in terminal
    assert log == ""
