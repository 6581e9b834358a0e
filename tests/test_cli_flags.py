"""No flag passes silently (issue 12): every command refuses unknown flags and abbreviations.

For each of the nine commands, through its ``main(argv)``: a misspelt own flag, a misspelt Beam
flag, a valid Beam flag (accepted by the two Beam jobs and landmarks-query, refused by the
others) and an abbreviation. A runner's own flags are accepted once the module that ``--runner``
names is imported; an unknown runner name is exit 2 with Beam's list of runners. Every check happens before any work, so no pipeline or training runs here; where
a valid Beam flag must get through, the split of own flags from Beam flags is checked instead,
down to the ``PipelineOptions`` values.
"""

from __future__ import annotations

import dataclasses

import pytest
from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)

from beam_pipelines import benchmark, cli, demo, evaluate, revisited, toy_data
from beam_pipelines.ingest import config as ingest_config
from beam_pipelines.ingest import pipeline as ingest
from beam_pipelines.predict import config as predict_config
from beam_pipelines.predict import pipeline as predict
from beam_pipelines.query import main as query
from tfrecords_schema import InputError
from trainer import config as train_config
from trainer import train as train_lib

PREDICT_ARGS = ["--model", "runs/demo/model/model.keras", "--test_data", "t-*.tfrecord",
                "--reference_data", "r-*.tfrecord", "--output_dir", "runs/typo"]
INGEST_ARGS = ["--manifest", "m.csv", "--output_dir", "runs/ingest"]
QUERY_ARGS = ["--model_dir", "runs/demo/model", "--references", "runs/demo/reference_features",
              "photo.jpg"]
DATAFLOW_ARGS = ["--runner=DataflowRunner", "--project", "my-project", "--region=europe-west1",
                 "--temp_location", "gs://bucket/tmp", "--setup_file", "./setup.py",
                 "--num_workers", "3", "--worker_machine_type", "n1-standard-4",
                 "--max_num_workers=10"]


def _error(capsys, name: str) -> str:
    """The one stderr line of a refused command line, without its ``<name>: error: `` prefix."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    prefix = f"{name}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


def _mains(tmp_path):
    """Command -> (main, the arguments of an otherwise valid command line)."""
    return {
        "landmarks-toy-data": (toy_data.main, ["--output_dir", str(tmp_path / "toy")]),
        "landmarks-ingest": (ingest.main, INGEST_ARGS),
        "landmarks-train": (train_lib.main, ["--train_data", "t", "--label_map", "l",
                                             "--model_dir", str(tmp_path / "model")]),
        "landmarks-predict": (predict.main, PREDICT_ARGS),
        "landmarks-evaluate": (evaluate.main, ["--submission", "s.csv", "--solution", "t.csv",
                                               "--output_dir", str(tmp_path / "eval")]),
        "landmarks-demo": (demo.main, ["--run_dir", str(tmp_path / "demo")]),
        "landmarks-revisited": (revisited.main, ["--model_dir", str(tmp_path / "model"),
                                                 "--data_root", "data", "--dataset", "roxford5k",
                                                 "--output_dir", str(tmp_path / "revisited")]),
        "landmarks-benchmark": (benchmark.main, ["--output_dir", str(tmp_path / "bench")]),
        "landmarks-query": (query.main, QUERY_ARGS + ["--output_dir", str(tmp_path / "query")]),
    }


# ---------------------------------------------------------------------------------------------
# The user's report.


def test_the_reported_predict_command_exits_2_naming_the_misspelt_flag(capsys):
    assert predict.main(PREDICT_ARGS + ["--blend_weigth", "0.9"]) == 2
    assert _error(capsys, "landmarks-predict") == (
        "unknown flag --blend_weigth (did you mean --blend_weight?)")
    assert predict.main(PREDICT_ARGS + ["--crop", "1", "--blend_weigth", "0.9"]) == 2
    message = _error(capsys, "landmarks-predict")
    assert "unknown flag --crop (did you mean --crops?)" in message
    assert "unknown flag --blend_weigth (did you mean --blend_weight?)" in message


# ---------------------------------------------------------------------------------------------
# Each command: misspelt own flag, misspelt Beam flag, Beam flag, abbreviation.

MISSPELT_OWN = {
    "landmarks-toy-data": (["--num_clases", "2"], "--num_classes"),
    "landmarks-ingest": (["--dev_fracton", "0.2"], "--dev_fraction"),
    "landmarks-train": (["--head_epochz", "1"], "--head_epochs"),
    "landmarks-predict": (["--blend_weigth", "0.9"], "--blend_weight"),
    "landmarks-evaluate": (["--scroes", "x.csv"], "--scores"),
    "landmarks-demo": (["--num_clases", "2"], "--num_classes"),
    "landmarks-revisited": (["--batch_sise", "8"], "--batch_size"),
    "landmarks-benchmark": (["--num_clases", "4"], "--num_classes"),
    "landmarks-query": (["--topp", "3"], "--top"),
}
ABBREVIATED = {
    "landmarks-toy-data": (["--num_class", "2"], "--num_classes"),
    "landmarks-ingest": (["--num_shard", "2"], "--num_shards"),
    "landmarks-train": (["--head_epoch", "1"], "--head_epochs"),
    "landmarks-predict": (["--crop", "1"], "--crops"),
    "landmarks-evaluate": (["--score", "x.csv"], "--scores"),
    "landmarks-demo": (["--crop", "1"], "--crops"),
    "landmarks-revisited": (["--batch", "8"], "--batch_size"),
    "landmarks-benchmark": (["--recognizer", "knn"], "--recognizers"),
    "landmarks-query": (["--crop", "1"], "--crops"),
}
BEAM_JOBS = ("landmarks-ingest", "landmarks-predict", "landmarks-query")


@pytest.mark.parametrize("name", sorted(MISSPELT_OWN))
def test_a_misspelt_own_flag_is_refused_with_a_suggestion(name, tmp_path, capsys):
    main, argv = _mains(tmp_path)[name]
    extra, meant = MISSPELT_OWN[name]
    assert main(argv + extra) == 2
    assert _error(capsys, name) == f"unknown flag {extra[0]} (did you mean {meant}?)"
    assert not list(tmp_path.iterdir())  # refused before anything is written


@pytest.mark.parametrize("name", sorted(ABBREVIATED))
def test_an_abbreviation_is_not_taken_for_the_flag(name, tmp_path, capsys):
    main, argv = _mains(tmp_path)[name]
    extra, meant = ABBREVIATED[name]
    assert main(argv + extra) == 2
    assert _error(capsys, name) == f"unknown flag {extra[0]} (did you mean {meant}?)"


@pytest.mark.parametrize("name", sorted(MISSPELT_OWN))
def test_a_misspelt_beam_flag_is_refused(name, tmp_path, capsys):
    main, argv = _mains(tmp_path)[name]
    assert main(argv + ["--runer", "FnApiRunner"]) == 2
    message = _error(capsys, name)
    assert message.startswith("unknown flag --runer")
    if name in BEAM_JOBS:
        assert message == "unknown flag --runer (did you mean --runner?)"


@pytest.mark.parametrize("name", sorted(set(MISSPELT_OWN) - set(BEAM_JOBS)))
def test_commands_without_beam_refuse_beam_flags(name, tmp_path, capsys):
    main, argv = _mains(tmp_path)[name]
    assert main(argv + ["--runner=FnApiRunner"]) == 2
    assert _error(capsys, name).startswith("unknown flag --runner")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", BEAM_JOBS)
def test_beam_jobs_pass_valid_beam_flags_on(name, tmp_path, capsys):
    # Valid Beam flags get through the flag check: the run then stops at its first input check.
    main = _mains(tmp_path)[name][0]
    argv = {"landmarks-ingest": ["--manifest", str(tmp_path / "missing.csv"),
                                 "--output_dir", str(tmp_path / "out")],
            "landmarks-predict": [*PREDICT_ARGS[:2], "--test_data", str(tmp_path / "none-*"),
                                  *PREDICT_ARGS[4:6], "--output_dir", str(tmp_path / "out")],
            "landmarks-query": ["--model_dir", str(tmp_path / "none"), "--references",
                                str(tmp_path / "none-*"), "--output_dir", str(tmp_path / "out"),
                                "photo.jpg"]}[name]
    beam = ["--runner", "FnApiRunner", "--direct_num_workers", "2", "--experiments", "a",
            "--experiments=b"]
    assert main(argv + beam) == 2
    message = _error(capsys, name)
    assert "unknown flag" not in message and ("not found" in message or "match" in message
                                              or "No such file" in message), message


def test_query_keeps_its_photos_apart_from_beam_flag_values():
    config, beam_args = query.parse_args(
        ["--runner", "FnApiRunner", *QUERY_ARGS[:4], "a.jpg", "--direct_num_workers", "2",
         "--top", "3", "b.jpg"])
    assert config.photos == ("a.jpg", "b.jpg") and config.top == 3
    assert beam_args == ["--runner", "FnApiRunner", "--direct_num_workers", "2"]


# ---------------------------------------------------------------------------------------------
# Runners: their own flags, names Beam does not know.


def test_an_unknown_runner_name_is_exit_2_with_beams_list(tmp_path, capsys):
    assert ingest.main(INGEST_ARGS + ["--runner=DaskRunner"]) == 2
    message = _error(capsys, "landmarks-ingest")
    assert message.startswith("--runner DaskRunner: unexpected pipeline runner; valid values "
                              "are ") and "FnApiRunner" in message and "DataflowRunner" in message
    assert predict.main(PREDICT_ARGS + ["--runner", "apache_beam.runners.NoSuchRunner"]) == 2
    assert "has no runner class NoSuchRunner" in _error(capsys, "landmarks-predict")


RUNNER_MODULE = '''
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner


class ClusterOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--cluster_address_{tag}", help="where the cluster listens")


class ClusterRunner(BundleBasedDirectRunner):
    pass
'''


def test_a_runner_given_by_dotted_path_brings_its_own_flags(tmp_path, monkeypatch, capsys):
    """Like Beam's DaskRunner (``--dask_client_address``): the runner's options class exists
    only once its module is imported, which the flag check does first. The module is written
    now under a fresh name, so no earlier import can have registered it."""
    import uuid

    tag = uuid.uuid4().hex[:8]
    (tmp_path / f"cluster_runner_{tag}.py").write_text(RUNNER_MODULE.format(tag=tag))
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = f"--runner=cluster_runner_{tag}.ClusterRunner"
    flag = f"--cluster_address_{tag}=127.0.0.1:8786"
    for parse_args, own_args in ((ingest_config.parse_args, INGEST_ARGS),
                                 (predict_config.parse_args, PREDICT_ARGS),
                                 (query.parse_args, QUERY_ARGS)):
        _, beam_args = parse_args(own_args + [runner, flag])
        assert beam_args == [runner, flag]
    options = PipelineOptions([runner, flag]).get_all_options()
    assert options[f"cluster_address_{tag}"] == "127.0.0.1:8786"
    # Unknown flags are still refused, with the runner's flags among the suggestions.
    assert ingest.main(INGEST_ARGS + [runner, f"--cluster_adress_{tag}=x"]) == 2
    assert _error(capsys, "landmarks-ingest") == (
        f"unknown flag --cluster_adress_{tag} (did you mean --cluster_address_{tag}?)")


def test_beams_dask_runner_by_dotted_path(capsys):
    """The issue's command line. Its flag passes when Beam's Dask runner imports (the
    ``dask`` package is installed); without it the runner is refused in one line naming the
    missing package, exit 2, never "unknown flag --dask_client_address"."""
    import importlib.util

    runner = "--runner=apache_beam.runners.dask.dask_runner.DaskRunner"
    argv = INGEST_ARGS + [runner, "--dask_client_address=127.0.0.1:8786"]
    if importlib.util.find_spec("dask") is not None:
        assert ingest_config.parse_args(argv)[1] == argv[len(INGEST_ARGS):]
        return
    assert ingest.main(argv) == 2
    message = _error(capsys, "landmarks-ingest")
    assert "does not import" in message and "dask" in message and "unknown flag" not in message


@pytest.mark.parametrize("parse_args, own_args, make_options", [
    (ingest_config.parse_args, INGEST_ARGS, ingest.pipeline_options),
    (predict_config.parse_args, PREDICT_ARGS, predict.pipeline_options),
], ids=["ingest", "predict"])
def test_beam_flags_reach_pipeline_options_unchanged(parse_args, own_args, make_options):
    beam = ["--direct_num_workers", "2", "--runner", "FnApiRunner", "--experiments", "a",
            "--experiments", "b", "--direct_running_mode=multi_processing"]
    config, beam_args = parse_args([*beam[:2], *own_args, *beam[2:]])
    assert beam_args == beam  # in order, untouched
    options = make_options(beam_args)
    assert options.view_as(DirectOptions).direct_num_workers == 2
    assert options.view_as(DirectOptions).direct_running_mode == "multi_processing"
    assert options.view_as(StandardOptions).runner == "FnApiRunner"
    assert options.view_as(DebugOptions).experiments == ["a", "b"]


@pytest.mark.parametrize("parse_args, own_args", [
    (ingest_config.parse_args, INGEST_ARGS), (predict_config.parse_args, PREDICT_ARGS),
], ids=["ingest", "predict"])
def test_dataflow_flags_pass(parse_args, own_args):
    _, beam_args = parse_args(own_args + DATAFLOW_ARGS)
    assert beam_args == DATAFLOW_ARGS
    options = PipelineOptions(beam_args)
    cloud = options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region, cloud.temp_location) == (
        "my-project", "europe-west1", "gs://bucket/tmp")
    assert options.view_as(SetupOptions).setup_file == "./setup.py"
    workers = options.view_as(WorkerOptions)
    assert (workers.num_workers, workers.machine_type, workers.max_num_workers) == (
        3, "n1-standard-4", 10)


def test_a_users_own_pipeline_options_pass():
    class MyJobOptions(PipelineOptions):
        @classmethod
        def _add_argparse_args(cls, parser):
            parser.add_argument("--my_table_xyz")
            parser.add_value_provider_argument("--my_template_value_xyz", type=int)

    class MyCloudOptions(GoogleCloudOptions):  # a subclass of a subclass counts too
        @classmethod
        def _add_argparse_args(cls, parser):
            parser.add_argument("--my_bucket_xyz")

    extra = ["--my_table_xyz", "t", "--my_template_value_xyz=3", "--my_bucket_xyz", "b"]
    _, beam_args = predict_config.parse_args(PREDICT_ARGS + extra)
    assert beam_args == extra
    assert PipelineOptions(beam_args).view_as(MyJobOptions).my_table_xyz == "t"
    with pytest.raises(InputError, match=r"unknown flag --my_tabel_xyz \(did you mean "
                                         r"--my_table_xyz\?\)"):
        predict_config.parse_args(PREDICT_ARGS + ["--my_tabel_xyz", "t"])


def test_a_bad_value_of_a_beam_flag_is_an_input_error(capsys):
    assert ingest.main(INGEST_ARGS + ["--direct_num_workers", "two"]) == 2
    assert "--direct_num_workers" in _error(capsys, "landmarks-ingest")


def test_a_stray_value_is_refused(capsys):
    assert predict.main(PREDICT_ARGS + ["--runner", "FnApiRunner", "stray"]) == 2
    assert _error(capsys, "landmarks-predict") == "unexpected argument 'stray'"


def test_no_job_flag_shadows_a_beam_flag():
    beam_flags = set(cli.option_strings(cli.beam_flag_parser()))
    for build in (ingest_config.build_arg_parser, predict_config.build_parser):
        own = set(cli.option_strings(build())) - {"-h", "--help"}
        assert not own & beam_flags, build.__module__


def test_ingest_run_with_a_config_checks_its_beam_flags(tmp_path):
    config = ingest_config.IngestConfig(manifest=str(tmp_path / "m.csv"),
                                        output_dir=str(tmp_path / "out"))
    with pytest.raises(InputError, match="unknown flag --runer"):
        ingest.run(["--runer=FnApiRunner"], config=config)


# ---------------------------------------------------------------------------------------------
# Parsers.


@pytest.mark.parametrize("build", [
    toy_data.build_parser, ingest_config.build_arg_parser, train_config.build_parser,
    predict_config.build_parser, evaluate.build_parser, demo.build_parser,
    revisited.build_parser, benchmark.build_parser, query.build_parser,
])
def test_every_parser_refuses_abbreviations(build):
    assert build().allow_abbrev is False


def test_a_misspelt_required_flag_is_named_rather_than_reported_missing(capsys):
    assert evaluate.main(["--submision", "s.csv", "--solution", "t.csv",
                          "--output_dir", "eval"]) == 2
    assert _error(capsys, "landmarks-evaluate") == (
        "unknown flag --submision (did you mean --submission?)")


def test_no_suggestion_when_nothing_is_close(capsys):
    assert toy_data.main(["--output_dir", "x", "--zzzzzz", "1"]) == 2
    assert _error(capsys, "landmarks-toy-data") == "unknown flag --zzzzzz"


def test_negative_numbers_are_values_not_flags():
    parser = cli.ErrorRaisingArgumentParser(prog="p")
    parser.add_argument("--offset", type=float)
    assert parser.parse_args(["--offset", "-0.5"]).offset == -0.5


# ---------------------------------------------------------------------------------------------
# The demo checks the flags it hands to landmarks-train before any stage runs.


def test_demo_checks_train_flags_up_front(tmp_path, capsys):
    config = demo.parse_args(["--run_dir", str(tmp_path / "d"), "--head_epochs", "1"])
    assert config.extra_train_flags == ("--head_epochs", "1")
    assert demo.main(["--run_dir", str(tmp_path / "d"), "--head_epochs", "-1"]) == 2
    assert "--head_epochs" in _error(capsys, "landmarks-demo")
    assert demo.main(["--run_dir", str(tmp_path / "d"), "--finetune_learning_rat", "1"]) == 2
    assert _error(capsys, "landmarks-demo") == (
        "unknown flag --finetune_learning_rat (did you mean --finetune_learning_rate?)")
    assert not (tmp_path / "d").exists()


def test_every_predict_config_field_is_a_flag_and_every_flag_a_field():
    """parse_args builds PredictConfig from the parser by field name: a field without a flag
    (other than those resolved from the model) or a flag without a field would be lost."""
    fields = {field.name for field in dataclasses.fields(predict_config.PredictConfig)}
    dests = {action.dest for action in predict_config.build_parser()._actions} - {"help"}
    assert fields - set(predict_config.RESOLVED_FROM_MODEL) == dests
    config, beam_args = predict_config.parse_args(
        PREDICT_ARGS + ["--rerank_top", "3", "--blend_weight", "0.25", "--runner=FnApiRunner"])
    assert (config.rerank_top, config.blend_weight, beam_args) == (
        3, 0.25, ["--runner=FnApiRunner"])
    assert (config.image_size, config.num_classes) == (0, 0)
