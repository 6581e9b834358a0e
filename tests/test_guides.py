"""The README and the guides in docs/ say true things, and their commands run as written.

- Commands are in command blocks (```bash, ```sh, ```console), and each such block either runs
  on one machine without network, or says what it needs in its first line, visibly to the
  reader: ``# needs: a gs:// bucket``. Blocks that obviously need more (gs://, Dataflow,
  TF_CONFIG, GPUs, downloads) must say so.
- The runnable blocks of each guide are run in order, in a fresh working directory that looks
  like a fresh clone (the repository's files linked in, no ``runs/``), as a user types them:
  ``landmarks-*`` (or ``.venv/bin/landmarks-*``, ``python -m <module>``) run their entry
  point's ``main(argv)`` in this process, after bash has expanded the line (quotes, globs);
  other lines (``ls``, ``cat``, ``python tests/gldv2_mini.py``) run through bash. Each must
  exit 0. ``make demo`` stands for the shared demo run (fixture ``demo_run``, copied into
  ``runs/demo``); ``make test`` is the suite itself and is not run.
- A few sizes would make the walk slow on a CPU; :data:`SUBSTITUTIONS` replaces them, and every
  substitution must be used, so the table cannot go stale. The miniature GLDv2 release needs
  a few flags changed, which docs/GLDV2.md itself tells its reader: those pairs must appear in
  it as written here. A runnable block holds one command per line (``\`` continues a line).
- Every relative link and image resolves to a file of the repository, every anchor to a
  heading; the README stays a landing page (at most 250 lines).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
GUIDES = [README, *sorted((REPO / "docs").glob("*.md"))]
COMMAND_LANGUAGES = {"bash", "sh", "shell", "console"}
NEEDS = re.compile(r"^# needs: (\S.*)$")
README_MAX_LINES = 250

# Size flags replaced for the walk (guide -> [(as written, as run)]). Training length and
# image size dominate on a CPU; the results do not matter here, only that every step runs.
TRAIN_SMALL = ("--preset quick --image_size 71 --head_epochs 1 --finetune_epochs 0 "
               "--steps_per_epoch 2 --max_dev_images 8 --calibrate_batchnorm_images 8")
SUBSTITUTIONS = {
    "YOUR_DATA.md": [("--preset quick", TRAIN_SMALL),
                     ("--output_dir runs/predict", "--output_dir runs/predict --crops 1")],
    "GLDV2.md": [
        # What the guide tells a user to change on the miniature release:
        ("--dev_fraction 0.02", "--dev_fraction 0.3"),
        ("--num_shards 512", "--num_shards 2"),
        ("--num_shards 256", "--num_shards 1"),
        ("--num_shards 64", "--num_shards 1"),
        ("--md5_dir gldv2/md5sum/test",
         "--md5_dir gldv2/md5sum/test --max_rejected_fraction 0.6"),
        # For time only:
        ("--preset quick", TRAIN_SMALL),
        ("--output_dir runs/predict", "--output_dir runs/predict --crops 1"),
    ],
    "PREDICTION.md": [("--output_dir runs/predict_recipe",
                       "--output_dir runs/predict_recipe --crops 1")],
    "BENCHMARKS.md": [("--seeds 0 ", "--seeds 0 --image_size 71 --crops 1 --head_epochs 1 "
                       "--finetune_epochs 0 --steps_per_epoch 2 ")],
}
STATED_IN_GUIDE = {"GLDV2.md": 5}  # the first N pairs are the guide's own advice

# Programs an unmarked block may run through bash (besides python and the entry points).
SHELL_PROGRAMS = {"ls", "cat", "head", "tail", "wc", "mkdir", "cp", "mv", "rm", "echo", "grep",
                  "find", "du", "sort", "python", "python3"}
# Text that tells a block needs more than one machine without network; it must say so.
NEEDS_HINTS = {
    "gs://": "a bucket", "DataflowRunner": "Dataflow", "TF_CONFIG": "several processes",
    "/gpu:": "GPUs", "--backbone_weights imagenet": "internet", "--preset full": "internet",
    "http://": "a web server", "https://": "internet", "curl ": "internet", "wget ": "internet",
    "delf:": "a DELF module", "pip ": "internet",
}


# ---- Markdown -------------------------------------------------------------------------------


@dataclasses.dataclass
class Block:
    """One fenced code block: its file, the line of its opening fence, its language and text."""

    path: pathlib.Path
    line: int
    language: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def needs(self) -> str | None:
        """The reason in a first line ``# needs: ...``, or None (the block is runnable)."""
        first = next((line for line in self.text.splitlines() if line.strip()), "")
        match = NEEDS.match(first.strip())
        return match.group(1) if match else None


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)\s*$")


def fenced_blocks(path: pathlib.Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (indented ones in list items included)."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    position = 0
    while position < len(lines):
        opening = _FENCE.match(lines[position])
        if not opening:
            position += 1
            continue
        indent, fence, language = opening.groups()
        body, end = [], position + 1
        while end < len(lines) and not (lines[end].strip().startswith(fence)
                                         and not lines[end].strip().strip(fence[0])):
            text = lines[end]
            body.append(text[len(indent):] if text.startswith(indent) else text.lstrip())
            end += 1
        blocks.append(Block(path, position + 1, language.lower(), "\n".join(body)))
        position = end + 1
    return blocks


def command_blocks(path: pathlib.Path) -> list[Block]:
    return [block for block in fenced_blocks(path) if block.language in COMMAND_LANGUAGES]


def commands(block: Block) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines left out;
    in a ``console`` block only the lines after a ``$`` prompt."""
    lines = block.text.splitlines()
    if block.language == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    joined, current = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.strip().startswith("#"):
            joined.append(current.strip())
        current = ""
    return joined


def _program(command: str) -> list[str]:
    """The first words of a command (``.venv/bin/`` dropped), for classifying it."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        words = command.split()
    if words and words[0].startswith(".venv/bin/"):
        words[0] = words[0][len(".venv/bin/"):]
    return words


# ---- entry points -----------------------------------------------------------------------------


def _entry_points() -> dict[str, str]:
    """Console script -> ``module:function``, as setup.py declares them."""
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    return dict(re.findall(r'"(landmarks-[a-z-]+)=([\w.]+:\w+)"', setup))


ENTRY_POINTS = _entry_points()
ENTRY_MODULES = {target.split(":")[0]: name for name, target in ENTRY_POINTS.items()}


def entry_point_of(words: list[str]) -> tuple[str, list[str]] | None:
    """(console script, the position where its arguments start) for a command that runs one."""
    if words and words[0] in ENTRY_POINTS:
        return words[0], 1
    if len(words) >= 3 and words[0] in ("python", "python3") and words[1] == "-m" and (
            words[2] in ENTRY_MODULES):
        return ENTRY_MODULES[words[2]], 3
    return None


def kind_of(command: str) -> str:
    """``demo``, ``suite``, ``entry_point``, ``shell`` or ``unknown``."""
    words = _program(command)
    if words[:2] == ["make", "demo"] and len(words) == 2:
        return "demo"
    if words[:2] == ["make", "test"]:
        return "suite"
    if entry_point_of(words):
        return "entry_point"
    if words and words[0] in SHELL_PROGRAMS:
        return "shell"
    return "unknown"


# ---- running a guide -------------------------------------------------------------------------


class GuideWalk:
    """Runs one guide's runnable commands in order in ``workdir`` (the current directory)."""

    def __init__(self, guide: pathlib.Path, workdir: pathlib.Path, request):
        self.guide, self.workdir, self.request = guide, workdir, request
        self.substitutions = SUBSTITUTIONS.get(guide.name, [])
        self.used = [0] * len(self.substitutions)
        self.env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}"
                                          f"{os.pathsep}{os.environ.get('PATH', '')}"}
        self.ran: list[str] = []

    def substitute(self, command: str) -> str:
        for position, (written, run_as) in enumerate(self.substitutions):
            if written in command:
                command = command.replace(written, run_as)
                self.used[position] += 1
        return command

    def run(self, block: Block, command: str) -> None:
        """Runs one command; asserts it exits 0; logs its wall and CPU seconds."""
        wall, cpu = time.perf_counter(), time.process_time()
        self._run(block, command)
        print(f"{time.perf_counter() - wall:6.1f} s wall {time.process_time() - cpu:6.1f} s CPU"
              f"  {command[:110]}")

    def _run(self, block: Block, command: str) -> None:
        kind = kind_of(command)
        command = self.substitute(command)
        where = f"{block.where}: `{command}`"
        if kind == "suite":
            return
        if kind == "demo":
            self._stand_in_for_the_demo()
        elif kind == "entry_point":
            code, output = self._run_in_process(command)
            assert code == 0, f"{where} exited with {code}:\n{output[-4000:]}"
        else:
            done = subprocess.run(["bash", "-c", command], cwd=self.workdir, env=self.env,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, (
                f"{where} exited with {done.returncode}:\n{done.stdout[-2000:]}"
                f"\n{done.stderr[-2000:]}")
        self.ran.append(command)

    def _argv(self, command: str) -> list[str]:
        """The words a shell would pass: bash expands the line (quotes, globs, ~)."""
        script = f"set -- {command}\nprintf '%s\\0' \"$@\""
        done = subprocess.run(["bash", "-c", script], cwd=self.workdir, env=self.env,
                              capture_output=True, timeout=60, check=True)
        return done.stdout.decode().split("\0")[:-1]

    def _run_in_process(self, command: str) -> tuple[int, str]:
        argv = self._argv(command)
        words = list(argv)
        words[0] = words[0].removeprefix(".venv/bin/")
        name, start = entry_point_of(words)
        module_name, function = ENTRY_POINTS[name].split(":")
        main = getattr(importlib.import_module(module_name), function)
        output = io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            code = main(argv[start:])
        return code, output.getvalue()

    def _stand_in_for_the_demo(self) -> None:
        """``make demo``: the suite's shared demo run, copied to runs/demo (its trained model
        files linked, not copied; checkpoints and logs left out)."""
        demo_run = self.request.getfixturevalue("demo_run")
        assert demo_run.exit_code == 0

        def link_or_copy(source, target):
            if source.endswith(".keras"):
                with contextlib.suppress(OSError):
                    os.link(source, target)
                    return target
            return shutil.copy2(source, target)

        shutil.copytree(demo_run.run_dir, self.workdir / "runs" / "demo",
                        ignore=shutil.ignore_patterns("checkpoints", "logs", "backup"),
                        copy_function=link_or_copy)


def _fresh_clone(workdir: pathlib.Path) -> None:
    """Links the repository's top-level files into ``workdir``, as a clone has them."""
    skipped = {".git", ".venv", "runs", ".pytest_cache", "build", "dist", "__pycache__"}
    for entry in REPO.iterdir():
        if entry.name not in skipped and not entry.name.endswith(".egg-info"):
            (workdir / entry.name).symlink_to(entry)


def _runnable_guides() -> list[pathlib.Path]:
    """The guides with a command to run (the README's `make demo` is tests/test_demo.py's)."""
    return [guide for guide in GUIDES[1:]
            if any(kind_of(command) != "suite"
                   for block in command_blocks(guide) if block.needs is None
                   for command in commands(block))]


# ---- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("guide", GUIDES, ids=lambda path: path.name)
def test_every_command_block_runs_or_says_what_it_needs(guide):
    problems = []
    for block in fenced_blocks(guide):
        if block.language not in COMMAND_LANGUAGES:
            for line in block.text.splitlines():  # a command typed at the line's start
                if line[:1].strip() and kind_of(line) in ("entry_point", "demo", "suite"):
                    problems.append(f"{block.where}: a command in a block that is not ```bash "
                                    f"(```{block.language})")
                    break
            continue
        if block.needs is not None:
            continue
        for command in commands(block):
            if kind_of(command) == "unknown":
                problems.append(f"{block.where}: `{command}` is not a command this test can "
                                "run: mark the block with a first line `# needs: ...`")
            for hint, what in NEEDS_HINTS.items():
                if hint in command:
                    problems.append(f"{block.where}: `{command}` needs {what} ({hint!r}): "
                                    "say so in a first line `# needs: ...`")
        if not commands(block):
            problems.append(f"{block.where}: a command block without a command")
    assert not problems, "\n".join(problems)


def test_the_readme_commands_are_the_two_make_targets():
    """The README's only command block is `make demo` / `make test`: the demo is run by
    tests/test_demo.py, the suite by itself."""
    blocks = command_blocks(README)
    assert [kind_of(command) for block in blocks for command in commands(block)] == [
        "demo", "suite"]


@pytest.mark.slow
@pytest.mark.parametrize("guide", _runnable_guides(), ids=lambda path: path.name)
def test_the_guide_runs_as_written(guide, tmp_path, monkeypatch, request):
    workdir = tmp_path / "clone"
    workdir.mkdir()
    _fresh_clone(workdir)
    monkeypatch.chdir(workdir)
    walk = GuideWalk(guide, workdir, request)
    for block in command_blocks(guide):
        if block.needs is None:
            for command in commands(block):
                walk.run(block, command)
    assert walk.ran, f"{guide.name}: nothing ran"
    unused = [written for (written, _), count in zip(walk.substitutions, walk.used) if not count]
    assert not unused, f"{guide.name}: substitutions never used (stale): {unused}"
    text = guide.read_text(encoding="utf-8")
    for written, run_as in walk.substitutions[:STATED_IN_GUIDE.get(guide.name, 0)]:
        assert f"`{written}` -> `{run_as}`" in text, (
            f"{guide.name} does not tell the reader to change `{written}` to `{run_as}`")


def test_substitutions_belong_to_guides_that_exist():
    names = {guide.name for guide in GUIDES}
    assert set(SUBSTITUTIONS) <= names


# ---- links ------------------------------------------------------------------------------------


def _without_code(text: str) -> str:
    """The Markdown text with fenced blocks and inline code blanked out (links in code are not
    links)."""
    kept, fence = [], None
    for line in text.splitlines():
        opening = _FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(2)
            kept.append("")
        elif fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            kept.append("")
        else:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def heading_anchors(path: pathlib.Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces
    to hyphens; a repeated heading gets -1, -2, ...)."""
    anchors, seen = set(), {}
    for line in _without_code(path.read_text(encoding="utf-8").replace("`", "")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


@pytest.mark.parametrize("guide", GUIDES, ids=lambda path: path.name)
def test_every_relative_link_and_image_resolves(guide):
    problems, targets = [], _LINK.findall(_without_code(guide.read_text(encoding="utf-8")))
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (guide.parent / file_part).resolve() if file_part else guide
        if REPO not in path.parents and path != REPO:
            problems.append(f"{target}: outside the repository")
            continue
        if not path.exists():
            problems.append(f"{target}: no such file")
            continue
        if anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
            problems.append(f"{target}: no heading #{anchor} in {path.relative_to(REPO)}")
    assert not problems, f"{guide.relative_to(REPO)}:\n" + "\n".join(problems)


def test_the_link_check_reads_links_and_anchors():
    """The parsers above find what they must (a check that finds nothing cannot fail)."""
    readme_links = _LINK.findall(_without_code(README.read_text(encoding="utf-8")))
    assert any(link.startswith("docs/") and link.endswith(".md") for link in readme_links)
    assert any(link.endswith((".png", ".jpg")) for link in readme_links)
    assert "what-is-in-this-photo-and-why-landmarks-query" in heading_anchors(
        REPO / "docs" / "PREDICTION.md")


def test_the_readme_is_a_landing_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    linked = set(re.findall(r"\(docs/(\w+\.md)[#)]", README.read_text(encoding="utf-8")))
    guides = {path.name for path in GUIDES if path != README}
    assert guides <= linked, f"guides the README does not link: {sorted(guides - linked)}"
