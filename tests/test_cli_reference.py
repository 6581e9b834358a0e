"""The command-line reference cannot drift from the code.

Every option string of every console script's argparse parser must appear in backticks in
``docs/REFERENCE.md`` (the configuration reference), every flag's help must state its default,
and bad flags must give exit status 2 with one ``landmarks-<name>: error:`` line.

Set ``LANDMARKS_CLI_REFERENCE=/path/to/file.md`` to check another Markdown file (e.g. a reference
before it replaces docs/REFERENCE.md).
"""

import argparse
import dataclasses
import os
import pathlib
import re

import pytest

from beam_pipelines import benchmark, demo, evaluate, revisited, toy_data
from beam_pipelines.ingest import config as ingest_config
from beam_pipelines.predict import config as predict_config
from beam_pipelines.query import main as query
from trainer import config as train_config

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = pathlib.Path(
    os.environ.get("LANDMARKS_CLI_REFERENCE", REPO / "docs" / "REFERENCE.md"))

PARSER_BUILDERS = {
    "landmarks-toy-data": toy_data.build_parser,
    "landmarks-ingest": ingest_config.build_arg_parser,
    "landmarks-train": train_config.build_parser,
    "landmarks-predict": predict_config.build_parser,
    "landmarks-evaluate": evaluate.build_parser,
    "landmarks-demo": demo.build_parser,
    "landmarks-revisited": revisited.build_parser,
    "landmarks-query": query.build_parser,
    "landmarks-benchmark": benchmark.build_parser,
}
# A help text ends by saying what happens when the flag is not given.
DEFAULT_STATEMENT = re.compile(r"\((default: .+|full: .+; quick: .+|required)\)$")


def _documented_actions(parser: argparse.ArgumentParser):
    return [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]


def test_every_console_script_is_checked_here():
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    scripts = set(re.findall(r'"(landmarks-[a-z-]+)=', setup))
    assert scripts == set(PARSER_BUILDERS)


@pytest.mark.parametrize("name", sorted(PARSER_BUILDERS))
def test_every_flag_appears_in_backticks_in_the_reference(name):
    text = REFERENCE.read_text(encoding="utf-8")
    parser = PARSER_BUILDERS[name]()
    assert parser.prog == name
    options = [option for action in parser._actions for option in action.option_strings]
    assert len(options) >= 4
    missing = [option for option in options if f"`{option}`" not in text]
    assert not missing, f"{name}: flags not documented in {REFERENCE}: {missing}"
    assert f"### `{name}`" in text, f"no ### section for {name} in {REFERENCE}"


@pytest.mark.parametrize("name", sorted(PARSER_BUILDERS))
def test_help_renders_and_every_flag_states_its_default(name):
    parser = PARSER_BUILDERS[name]()
    help_text = parser.format_help()
    assert help_text.startswith(f"usage: {name}")
    for action in _documented_actions(parser):
        assert action.help, f"{name} {action.option_strings}: no help text"
        expanded = action.help % {"default": action.default, "prog": name}
        assert DEFAULT_STATEMENT.search(expanded), (
            f"{name} {action.option_strings}: help does not end with its default: {expanded!r}")
        for option in action.option_strings:
            assert option in help_text


@pytest.mark.parametrize("name", ["landmarks-ingest", "landmarks-predict"])
def test_beam_jobs_say_where_unknown_flags_go(name):
    epilog = PARSER_BUILDERS[name]().format_help()
    assert "PipelineOptions" in epilog and "--runner=DataflowRunner" in epilog


def test_train_help_shows_the_values_each_preset_really_uses():
    required = {"train_data": "t", "label_map": "l", "model_dir": "m"}
    argv = [text for name, value in required.items() for text in (f"--{name}", value)]
    for preset in sorted(train_config.PRESETS):
        resolved = train_config.config_from_args(argv + ["--preset", preset])
        expected = {**train_config.preset_defaults(preset), "train_data": "t", "label_map": "l"}
        actual = {
            **{f.name: getattr(resolved.data, f.name)
               for f in dataclasses.fields(train_config.DataConfig)},
            **{f.name: getattr(resolved.model, f.name)
               for f in dataclasses.fields(train_config.ModelConfig)},
            **{f.name: getattr(resolved.distribution, f.name)
               for f in dataclasses.fields(train_config.DistributionConfig)},
            **{f"{phase.name}_{f.name}": getattr(phase, f.name)
               for phase in resolved.phases for f in dataclasses.fields(train_config.PhaseConfig)
               if f.name != "name"},
            "verbose": resolved.verbose,
        }
        assert expected == actual, preset
    # Every train flag except the required paths and --preset shows a preset default.
    flags = {action.dest for action in _documented_actions(train_config.build_parser())}
    assert flags - set(required) - {"preset"} == set(train_config.preset_defaults("full")) - set(
        required)
    help_text = " ".join(train_config.build_parser().format_help().split())
    assert "(full: 299; quick: 96)" in help_text  # --image_size differs between the presets
    assert "(full: 1e-06; quick: none)" in help_text  # --finetune_final_learning_rate
    assert "(default: 0.05)" in help_text  # --dropout is the same in both


def _one_error_line(capsys, name: str) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"{name}: error:") and "\n" not in error, error
    return error


def test_unknown_flags_exit_2_with_one_line(tmp_path, capsys):
    output = tmp_path / "toy"
    assert toy_data.main(["--output_dir", str(output), "--bogus_flag_xyz"]) == 2
    assert "--bogus_flag_xyz" in _one_error_line(capsys, "landmarks-toy-data")
    assert not output.exists()  # rejected before anything is written

    assert toy_data.main(["--output_dir", str(output), "--num_classes", "many"]) == 2
    assert "--num_classes" in _one_error_line(capsys, "landmarks-toy-data")

    paths = ["--submission", str(tmp_path / "s.csv"), "--solution", str(tmp_path / "t.csv"),
             "--output_dir", str(tmp_path / "eval")]
    assert evaluate.main(paths + ["--bogus_flag_xyz"]) == 2
    assert "--bogus_flag_xyz" in _one_error_line(capsys, "landmarks-evaluate")
    assert evaluate.main(paths[2:]) == 2
    assert "--submission" in _one_error_line(capsys, "landmarks-evaluate")

    from trainer import train as train_lib

    assert train_lib.main(["--bogus_flag_xyz"]) == 2
    assert "--bogus_flag_xyz" in _one_error_line(capsys, "landmarks-train")

    # The demo hands unknown flags to landmarks-train, so check a bad value of its own.
    assert demo.main(["--run_dir", str(tmp_path / "demo"), "--crops", "all"]) == 2
    assert "--crops" in _one_error_line(capsys, "landmarks-demo")
    assert not (tmp_path / "demo").exists()


def test_beam_jobs_exit_2_for_a_missing_or_malformed_value(tmp_path, capsys):
    # Unknown flags go to Beam, so a missing required value or a malformed one is the bad input.
    from beam_pipelines.ingest import pipeline as ingest
    from beam_pipelines.predict import pipeline as predict

    output = tmp_path / "out"
    assert ingest.main(["--output_dir", str(output), "--runner=FnApiRunner"]) == 2
    assert "--manifest" in _one_error_line(capsys, "landmarks-ingest")
    assert ingest.main(["--manifest", "m.csv", "--output_dir", str(output),
                        "--num_shards", "four"]) == 2
    assert "--num_shards" in _one_error_line(capsys, "landmarks-ingest")

    assert predict.main(["--model", str(tmp_path / "model.keras"), "--output_dir", str(output),
                         "--runner=FnApiRunner"]) == 2
    assert "--test_data" in _one_error_line(capsys, "landmarks-predict")
    assert predict.main(["--crops", "x"]) == 2
    assert "--crops" in _one_error_line(capsys, "landmarks-predict")
    assert not output.exists()
