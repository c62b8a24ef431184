"""One CLI stack: every command is a typed function parsed by jsonargparse, reads `--config`, answers
`--help`, and turns a bad flag into one stderr line and exit code 2; the decoding flags are generated from
DecodeOptions (their defaults are its defaults); the older spellings (-m, --max-len-b, a bare --quiet, a
repeated -r) still parse; libraries do not parse arguments."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from nmt_moe.cli import COMMANDS, main
from nmt_moe.cli import evaluate as evaluate_cli
from nmt_moe.cli import serve as serve_cli
from nmt_moe.cli import translate as translate_cli
from nmt_moe.cli.parsing import Command, build_parser, canonical_argv, option_kinds, parse
from nmt_moe.decoding.options import BatchOptions, DecodeOptions, SamplingOptions

PACKAGE = Path(__file__).resolve().parents[2] / "nmt_moe"
TYPED = [name for name in COMMANDS if name not in ("train", "prepare")]  # prepare: the data module's flags


@pytest.mark.parametrize("command", [name for name in COMMANDS if name != "train"])
def test_every_command_has_help_with_config(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"nmt-moe {command}" in out and "--config" in out


@pytest.mark.parametrize("command", TYPED)
def test_a_bad_flag_is_one_line_and_exit_2(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--bogus", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"nmt-moe {command}: error: ") and "Traceback" not in err


@pytest.mark.parametrize("module", [translate_cli, evaluate_cli, serve_cli])
def test_decoding_flag_defaults_are_decode_options_defaults(module) -> None:
    defaults = build_parser(module.COMMAND).get_defaults()
    for cls in (DecodeOptions, BatchOptions):
        for field in dataclasses.fields(cls):
            if field.name not in module.COMMAND.skip:
                assert defaults[field.name] == field.default, (module.__name__, field.name)


def test_old_spellings_parse_into_typed_options() -> None:
    argv = ["-m", "a.ckpt", "-m", "b", "--beam", "3", "--max-len-b", "4", "--quiet", "--min-len=2",
            "--output-format", "jsonl", "--sampling", "false", "--top-p", "0.5"]  # fmt: skip
    kwargs = parse(translate_cli.COMMAND, argv)
    assert kwargs["model"] == [Path("a.ckpt"), Path("b")] and kwargs["quiet"] and not kwargs["sampling"]
    assert kwargs["options"] == DecodeOptions(beam_size=3, max_len_b=4, min_len=2)
    assert kwargs["output_format"] == "jsonl" and kwargs["sampling_options"] == SamplingOptions(top_p=0.5)
    assert kwargs["batching"] == BatchOptions()


def test_canonical_argv_words_lists_and_numbers() -> None:
    def command(out: Path, inputs: list[Path] | None = None, flag: bool = False, shift: int = 0) -> None:
        """A toy command.

        Args:
            out: output
            inputs: inputs
            flag: a flag
            shift: a number
        """

    toy = Command("toy", command, aliases={"-o": "--out"}, positional="inputs")
    kinds = option_kinds(toy)
    argv = ["--config", "c.yaml", "a", "-o", "x", "--flag", "--shift", "-3", "b", "--inputs", "c"]
    assert canonical_argv(argv, kinds, toy.aliases, toy.positional) == [
        "--config=c.yaml", "--inputs", '["a", "b", "c"]', "--out=x", "--flag", "true", "--shift=-3",
    ]  # fmt: skip
    assert parse(toy, ["a", "b", "-o", "x", "--shift", "-3"]) == {
        "out": Path("x"), "inputs": [Path("a"), Path("b")], "flag": False, "shift": -3,
    }  # fmt: skip


def test_config_file_gives_the_same_result_as_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ref1, ref2, hyp = tmp_path / "r1", tmp_path / "r2", tmp_path / "h"
    ref1.write_text("the cat sat on the mat\na dog runs\n")
    ref2.write_text("a cat sat on the mat\nthe dog runs\n")
    hyp.write_text("the cat sat on a mat\na dog runs fast\n")
    assert main(["evaluate", "-r", str(ref1), "-r", str(ref2), "-i", str(hyp), "--json"]) == 0
    by_flags = json.loads(capsys.readouterr().out)
    config = tmp_path / "evaluate.yaml"
    config.write_text(yaml.safe_dump({"ref": [str(ref1), str(ref2)], "hyp": str(hyp), "json": True}))
    assert main(["evaluate", "--config", str(config)]) == 0
    by_config = json.loads(capsys.readouterr().out)
    assert by_config == by_flags and by_flags["lines"] == 2 and 0 < by_flags["bleu"] < 100
    config.write_text(yaml.safe_dump({"ref": [str(ref1)], "hyp": str(hyp), "json": True}))
    assert main(["evaluate", "--config", str(config), "-r", str(ref1), "-r", str(ref2)]) == 0  # flags win
    assert json.loads(capsys.readouterr().out) == by_flags


# the modules that were half library, half command line before nmt_moe/cli/ existed
LIBRARIES = ["evaluation.py", "checkpoint.py", "averaging.py", "plan.py", "routing.py", "scoring.py",
             "serving/app.py", "decoding/translate.py", "data/prepare.py",
             "training/tracking.py"]  # fmt: skip


@pytest.mark.parametrize("library", LIBRARIES)
def test_libraries_do_not_parse_arguments(library: str) -> None:
    imported = set()
    for node in ast.walk(ast.parse((PACKAGE / library).read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
    assert not {name for name in imported if name.split(".")[0] in ("argparse", "jsonargparse")}, library
    assert not {name for name in imported if name.startswith("nmt_moe.cli")}, library


def test_an_unknown_command_is_one_line_and_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["translat", "-m", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'translat'" in err and "translate" in err
