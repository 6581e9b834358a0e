"""The package Dataflow stages for ``--setup_file ./setup.py``, built offline by Beam itself.

``DataflowRunner`` turns ``--setup_file`` into a staged ``workflow.tar.gz`` through
``apache_beam.transforms.environments.python_sdk_dependencies(options)``, which calls
``Stager.create_job_resources``; every worker then pip-installs that tarball. These tests call
the same function with ``--runner=DataflowRunner`` (it only changes which artifacts are listed;
nothing is submitted), open the tarball it stages and check what the workers would receive.

Offline: Beam 2.77 builds the sdist with ``python -m build --no-isolation --sdist`` (no isolated
build env, so nothing is downloaded) and, when the ``build`` module is missing (as in this venv),
falls back to ``python setup.py sdist --dist-dir <temp>``; both use the launcher's installed
setuptools. ``PIP_NO_INDEX=1`` makes any attempt to fetch a package fail instead of going out.

The repo stays untouched: ``setup.py sdist`` writes ``landmarks.egg-info`` next to ``setup.py``
and re-reads a ``SOURCES.txt`` it finds there. ``DIST_EXTRA_CONFIG`` (an extra distutils config
file, read by setuptools' own distutils) sets ``[egg_info] egg_base`` to ``tmp_path``, so the
build neither writes into the checkout nor picks up a stale ``SOURCES.txt`` from an earlier
``pip install -e .``. (The sdist's short-lived release tree ``landmarks-0.1.0/`` still appears in
the repo root while the archive is written; distutils removes it at once.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tfrecords_schema", "beam_pipelines", "trainer", "rescoring")
REQUIRED_FILES = (
    "setup.py",
    "tfrecords_schema/__init__.py",
    "beam_pipelines/ingest/pipeline.py",
    "beam_pipelines/predict/pipeline.py",
    "trainer/layers.py",
    "rescoring/verification.py",
)
# Top-level files an sdist may legitimately carry besides the packages.
METADATA_FILES = {"PKG-INFO", "README.md", "setup.py", "setup.cfg", "MANIFEST.in", "LICENSE"}
CONSOLE_SCRIPTS = ("landmarks-toy-data", "landmarks-ingest", "landmarks-train",
                   "landmarks-predict", "landmarks-evaluate", "landmarks-demo",
                   "landmarks-revisited")


def _root_status() -> set[str]:
    """Root-level lines of ``git status --porcelain --ignored`` (read-only git).

    Only root-level entries: that is where a build leaves ``*.egg-info/``, ``build/``, ``dist/``
    or a release tree, while other people may be editing files inside the packages meanwhile.
    """
    lines = subprocess.run(
        ["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True,
        text=True, check=True,
    ).stdout.splitlines()
    return {line for line in lines if "/" not in line[3:].rstrip("/")}


def _egg_info_snapshot() -> dict[str, bytes]:
    folder = REPO / "landmarks.egg-info"
    if not folder.is_dir():
        return {}
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def _stage(tmp_path: Path, monkeypatch, stale_sources: list[str] | None = None) -> dict[str, str]:
    """Runs Dataflow's staging for ``--setup_file <repo>/setup.py``; returns staged name -> file.

    ``stale_sources``: if given, a ``SOURCES.txt`` with these lines is left in the egg-info
    folder first, as an earlier ``pip install -e .`` leaves one in a checkout.
    """
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.stager import Stager
    from apache_beam.transforms import environments

    egg_base = tmp_path / "egg_base"
    egg_base.mkdir()
    if stale_sources is not None:
        (egg_base / "landmarks.egg-info").mkdir()
        (egg_base / "landmarks.egg-info" / "SOURCES.txt").write_text("\n".join(stale_sources))
    build_config = tmp_path / "distutils.cfg"
    build_config.write_text(f"[egg_info]\negg_base = {egg_base}\n")
    monkeypatch.setenv("DIST_EXTRA_CONFIG", str(build_config))
    monkeypatch.setenv("PIP_NO_INDEX", "1")

    staging = tmp_path / "staging"
    staging.mkdir()
    options = PipelineOptions([
        "--runner=DataflowRunner",
        "--setup_file", str(REPO / "setup.py"),
        "--requirements_cache", str(tmp_path / "requirements_cache"),
    ])
    artifacts = environments.python_sdk_dependencies(options, tmp_dir=str(staging))
    return {staged: source for source, staged, _ in Stager.extract_staging_tuple_iter(artifacts)}


def _members(tarball: str) -> set[str]:
    """Member paths relative to the sdist's single root folder (``landmarks-0.1.0/``)."""
    with tarfile.open(tarball) as archive:
        names = archive.getnames()
    roots = {name.split("/", 1)[0] for name in names}
    assert roots == {"landmarks-0.1.0"}
    return {name.split("/", 1)[1] for name in names if "/" in name}


def _package_sources() -> set[str]:
    """Every ``.py`` file of the four packages in the checkout, relative to the repo."""
    return {
        str(path.relative_to(REPO))
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }


@pytest.fixture
def repo_guard():
    """Fails the test if staging changed the checkout (status or the ignored egg-info)."""
    status, egg_info = _root_status(), _egg_info_snapshot()
    yield
    assert _root_status() == status
    assert _egg_info_snapshot() == egg_info
    assert not (REPO / "landmarks-0.1.0").exists() and not (REPO / "build").exists()


def test_staged_workflow_tarball_holds_the_four_packages_only(tmp_path, monkeypatch, repo_guard):
    staged = _stage(tmp_path, monkeypatch)
    # Only the setup package and the launcher's dependency list: nothing had to be downloaded.
    assert set(staged) == {"workflow.tar.gz", "submission_environment_dependencies.txt"}
    tarball = staged["workflow.tar.gz"]
    assert Path(tarball).parent == tmp_path / "staging"

    members = _members(tarball)
    for name in REQUIRED_FILES:
        assert name in members, name
    # Complete packages: a sub-folder without __init__.py would be dropped by find_packages.
    missing = _package_sources() - members
    assert not missing, f"package files not staged: {sorted(missing)}"
    top_level_dirs = {name.split("/", 1)[0] for name in members if "/" in name}
    assert top_level_dirs == set(PACKAGES)  # no tests/, bench/, runs/, .venv/, .ci/, build/
    top_level_files = {name for name in members if "/" not in name} - top_level_dirs
    assert top_level_files <= METADATA_FILES and "setup.py" in top_level_files
    for unwanted in ("tests/", ".venv/", "runs/", "bench/", ".git/"):
        assert not any(name.startswith(unwanted) for name in members), unwanted
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in members)


def test_staged_tarball_builds_offline_into_the_installable_package(tmp_path, monkeypatch,
                                                                    repo_guard):
    """What a worker does with workflow.tar.gz (pip builds it), minus the dependencies."""
    tarball = _stage(tmp_path, monkeypatch)["workflow.tar.gz"]
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--quiet", "--wheel-dir", str(wheels), tarball],
        check=True, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    (wheel,) = wheels.glob("landmarks-0.1.0-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read("landmarks-0.1.0.dist-info/entry_points.txt").decode()
    assert _package_sources() <= names
    assert {name.split("/", 1)[0] for name in names if "/" in name} == {
        *PACKAGES, "landmarks-0.1.0.dist-info"}
    for script in CONSOLE_SCRIPTS:
        assert f"{script} = " in entry_points, script


def test_tests_stay_out_even_with_a_leftover_sources_list(tmp_path, monkeypatch, repo_guard):
    """The state of this checkout after ``pip install -e .`` with a current setuptools: without
    MANIFEST.in's ``prune tests``, setuptools would re-read the leftover SOURCES.txt and stage
    tests/ (and newer setuptools add tests/test*.py to every sdist by default)."""
    staged = _stage(tmp_path, monkeypatch,
                    stale_sources=["setup.py", "tests/test_tfrecords_schema.py"])
    members = _members(staged["workflow.tar.gz"])
    assert not any(name.startswith("tests/") for name in members)
