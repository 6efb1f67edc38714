"""The CLI: user mistakes end in one clear line and exit != 0, never a traceback."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from semclip_batch.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error")]
    assert len(lines) == 1 and fragment in lines[0], result.output


def test_every_command_help_has_an_example():
    for cmd in ("synth", "run", "demo", "aggregate", "query", "eval", "pretrain", "train", "report"):
        result = invoke(cmd, "--help")
        assert result.exit_code == 0 and "Example" in result.output
    assert "0.95" in invoke("run", "--help").output  # default thresholds shown


def test_run_needs_pretrained(synth_lot, tmp_path):
    result = invoke("run", str(synth_lot / "manifest.csv"), "--out", str(tmp_path / "o"), "--backbone", "semclip-tiny")
    assert_one_line_error(result, "--pretrained")


def test_unknown_backbone(synth_lot, tmp_path):
    result = invoke("run", str(synth_lot / "manifest.csv"), "--out", str(tmp_path / "o"), "--backbone", "ViT-Nope",
                    "--pretrained", "none")
    assert_one_line_error(result, "unknown backbone 'ViT-Nope'")


def test_missing_pretrained_file(synth_lot, tmp_path):
    result = invoke("run", str(synth_lot / "manifest.csv"), "--out", str(tmp_path / "o"), "--backbone", "semclip-tiny",
                    "--pretrained", str(tmp_path / "nope.safetensors"))
    assert_one_line_error(result, "not found")


def test_checksum_mismatch(synth_lot, tmp_path):
    result = invoke("run", str(synth_lot / "manifest.csv"), "--out", str(tmp_path / "o"), "--backbone", "semclip-tiny",
                    "--pretrained", "none", "--pretrained-sha256", "ab" * 32)
    assert_one_line_error(result, "checksum mismatch")


@pytest.mark.parametrize("content", [None, b"uri,lot_id\n", b"\x00\x01garbage"])
def test_unreadable_manifest(tmp_path, content):
    path = tmp_path / "m.csv"
    if content is not None:
        path.write_bytes(content)
    result = invoke("run", str(path), "--out", str(tmp_path / "o"), "--backbone", "semclip-tiny", "--pretrained", "none")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.count("\n") <= 2


def test_secret_storage_option_refused(synth_lot, tmp_path):
    result = invoke("run", str(synth_lot / "manifest.csv"), "--out", str(tmp_path / "o"), "--pretrained", "none",
                    "--storage-option", "secret=hunter2")
    assert result.exit_code != 0 and "hunter2" not in result.output


def test_synth_cli(tmp_path):
    result = invoke("synth", str(tmp_path / "d"), "--lots", "1", "--per-class", "1", "--sizes", "128x160")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "manifest.csv").exists() and (tmp_path / "d" / "manifest.parquet").exists()
    assert_one_line_error(invoke("synth", str(tmp_path / "e"), "--sizes", "big"), "--sizes")
    assert_one_line_error(invoke("synth", str(tmp_path / "e"), "--formats", "gif"), "--formats")


def test_options_are_offered_only_where_used(synth_lot, tmp_path):
    for command in ("train", "pretrain"):
        assert "--precision" not in invoke(command, "--help").output
    assert "--cache-dir" not in invoke("run", "--help").output and "--cache-dir" not in invoke("pretrain", "--help").output
    assert "--cache-dir" in invoke("train", "--help").output and "--precision" in invoke("run", "--help").output
    result = invoke("train", str(synth_lot / "manifest.csv"), "--out", str(tmp_path / "c"), "--backbone", "semclip-tiny",
                    "--pretrained", "none", "--shots", "0")
    assert_one_line_error(result, "--shots must be >= 1")
    result = invoke("pretrain", str(synth_lot / "manifest.csv"), "--out", str(tmp_path / "w.safetensors"),
                    "--backbone", "semclip-tiny", "--steps", "0")
    assert_one_line_error(result, "--steps")
    result = invoke("pretrain", str(synth_lot / "manifest.csv"), "--out", str(tmp_path / "w.safetensors"),
                    "--backbone", "semclip-tiny", "--keep-tokens", "0")
    assert_one_line_error(result, "--keep-tokens")
    result = invoke("pretrain", str(synth_lot / "manifest.csv"), "--out", str(tmp_path / "w.safetensors"),
                    "--backbone", "semclip-tiny", "--heldout", "0.5")
    assert_one_line_error(result, "--heldout in [0, 0.5)")
    # a checkpoint keeps its own prompts: --prompts with run --model is refused, not silently ignored
    result = invoke("run", str(synth_lot / "manifest.csv"), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "c"),
                    "--prompts", str(tmp_path / "missing.json"))
    assert_one_line_error(result, "--prompts applies to zero-shot runs")
    assert not (tmp_path / "o").exists()


def test_train_method_options_end_in_one_line(synth_lot, tmp_path):
    base = ("train", str(synth_lot / "manifest.csv"), "--backbone", "semclip-tiny", "--pretrained", "none")
    result = invoke(*base, "--out", str(tmp_path / "c"), "--method", "winclip", "--no-vv")
    assert_one_line_error(result, "SEM-CLIP options")
    result = invoke(*base, "--out", str(tmp_path / "c"), "--method", "patchcore")
    assert result.exit_code != 0 and "Traceback" not in result.output
    result = invoke(*base, "--out", str(tmp_path / "w"), "--method", "winclip")
    assert result.exit_code == 0, result.output
    assert "wrote winclip checkpoint" in result.output and (tmp_path / "w" / "checkpoint.json").exists()


def test_outputs_of_the_wrong_kind_are_refused_before_any_work(synth_lot, tmp_path):
    afile, adir, wdir = tmp_path / "afile", tmp_path / "adir.csv", tmp_path / "w.safetensors"
    afile.write_bytes(b"")
    adir.mkdir()
    wdir.mkdir()
    m = str(synth_lot / "manifest.csv")
    tiny = ("--backbone", "semclip-tiny", "--pretrained", "shipped")
    cases = [
        (("train", m, "--out", str(afile), *tiny), "is a file"),
        (("train", m, "--out", str(afile / "sub" / "ck"), *tiny), "which is a file"),
        (("run", m, "--out", str(afile), *tiny), "is a file"),
        (("pretrain", m, "--out", str(wdir), "--steps", "2", *tiny), "is a folder"),
        (("manifest", "from-prefix", str(synth_lot / "images"), "--out", str(adir)), "is a folder"),
        (("synth", str(afile), "--lots", "1", "--per-class", "1"), "is a file"),
        (("demo", str(afile)), "is a file"),
        (("manifest", "from-klarf", str(tmp_path / "none.001"), "--images", str(tmp_path), "--out", str(adir)),
         "is a folder"),
        (("export", "klarf", str(tmp_path / "no-run"), "--lot", "L1", "--out", str(wdir)), "is a folder"),
        (("suggest", str(tmp_path / "no-run"), "--out", str(adir), "--overwrite"), "is a folder"),
    ]
    for args, fragment in cases:
        result = invoke(*args)
        assert_one_line_error(result, fragment)
        assert "epoch" not in result.output and "step " not in result.output  # refused before the work
    assert afile.read_bytes() == b"" and not any(adir.iterdir()) and not any(wdir.iterdir())


def test_run_out_inside_its_input_folder_is_refused_before_any_work(tmp_path):
    """The first run worked, and every rerun (the resume after a kill) listed OUT's own files as frames and refused
    them. A manifest beside OUT is fine: only a folder input is listed."""
    from semclip_batch.io.targets import refuse_out_inside_input_folder

    (tmp_path / "L1" / "W1").mkdir(parents=True)
    (tmp_path / "L1" / "W1" / "a.png").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path)
    for out in (tmp_path / "out", tmp_path / "link" / "out"):
        result = invoke("run", str(tmp_path), "--pattern", "{lot_id}/{wafer_id}/{name}.{ext}", "--out", str(out),
                        "--backbone", "semclip-tiny", "--pretrained", "none")
        assert_one_line_error(result, "is inside the input folder")
        assert not out.exists()
    (tmp_path / "m.csv").write_text("uri,lot_id,wafer_id\nL1/W1/a.png,L1,W1\n")  # a manifest: OUT beside it is fine
    refuse_out_inside_input_folder(str(tmp_path / "m.csv"), str(tmp_path / "out"))
    refuse_out_inside_input_folder(str(tmp_path / "L1"), str(tmp_path / "out"))  # a folder that does not hold OUT


def test_an_output_whose_kind_cannot_be_read_is_left_to_the_write(monkeypatch, tmp_path):
    """A store that lets a user write but not list answers the check with an error: the check stands aside (the
    write reports whatever is wrong), it never turns a write that would succeed into a failure."""
    from fsspec.implementations.local import LocalFileSystem

    from semclip_batch.io import targets

    def denied(self, path):
        raise PermissionError("Access Denied")

    monkeypatch.setattr(LocalFileSystem, "isdir", denied)
    monkeypatch.setattr(LocalFileSystem, "isfile", denied)
    targets.check_target(str(tmp_path / "w.safetensors"), "file", "--out")
    targets.check_target(str(tmp_path / "ck"), "folder", "--out")


def test_an_unexpected_error_is_one_line_of_at_most_500_characters_with_its_hint():
    """A library error the CLI did not foresee: shortened so that the line with its -vv hint stays within 500."""
    import click

    from semclip_batch.cli.options import user_errors
    from semclip_batch.errors import MAX_MESSAGE

    @user_errors
    def fails() -> None:
        raise RuntimeError("x" * 2000 + "\nsecond line")

    with pytest.raises(click.ClickException) as caught:
        fails()
    message = caught.value.format_message()
    assert len(message) <= MAX_MESSAGE == 500 and "\n" not in message
    assert message.startswith("RuntimeError: xxx") and message.endswith("(rerun with -vv for the traceback)")
