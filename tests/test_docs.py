"""The documentation a reader gets with the repository: every link in it
resolves inside the repository, nothing points outside it, the README's
Python example runs, and each command's --help prints its examples line
for line."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from mdu_cli.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "tofu" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    files = []
    for name in listed:
        path = ROOT / name
        if path.is_file() and path.suffix in (".py", ".md", ".toml", ".yaml", ".yml", ".json", ".txt", ".c", "") \
                and path.stat().st_size < 2_000_000:
            files.append(path)
    return files


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        resolved = (page.parent / target.split("#")[0]).resolve()
        assert resolved.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
        assert resolved.is_relative_to(ROOT), f"{page.relative_to(ROOT)} links outside the repository: {target}"


def test_the_readme_is_a_front_page_one_click_from_every_reference():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 260
    for page in ("method", "architecture", "unlearn", "finetune", "eval", "diff", "push", "scale", "benchmarks",
                 "reliability", "install"):
        assert f"(docs/{page}.md)" in readme, page
    # The two commands CI and a new user run.
    assert "pip install torch==2.13.0 && pip install -e . && mdu unlearn --config examples/demo/run.yaml" in readme
    test_command = "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q"
    assert test_command in readme and test_command in (ROOT / ".ci" / "run").read_text()


def test_no_file_refers_to_anything_outside_the_repository():
    outside = ("../" + "shared", "METHOD" + ".md", "STYLE" + ".md")
    found = [f"{path.relative_to(ROOT)}: {word}" for path in _tracked_text_files()
             for word in outside if word in path.read_text(encoding="utf-8", errors="replace")]
    assert not found, found


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The notebook example of the README, run as written in a copy of the
    demo: it unlearns, diffs and evaluates."""
    shutil.copytree(ROOT / "examples" / "demo", tmp_path / "examples" / "demo")
    monkeypatch.chdir(tmp_path)
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    names: dict = {}
    exec(compile(block, "README.md", "exec"), names)
    assert names["result"].model is not None and (tmp_path / "out" / "py-demo" / "mdu_run.json").is_file()
    assert names["report"]["total"]["rel_l2"] > 0
    forget = names["scores"]["splits"]["forget"]
    assert forget["records"] == 4 and 0 < forget["probability"] < 1


@pytest.mark.parametrize("command", ["unlearn", "finetune", "eval", "generate", "diff", "push"])
def test_help_prints_every_example_line_as_written(command):
    """Each line of a command's examples (the continuation lines of a long
    command included) is its own line of --help, not run into the next."""
    import importlib

    module = {"eval": "evaluate", "generate": "evaluate"}.get(command, command)
    epilog = importlib.import_module(f"mdu_cli.commands.{module}")
    examples = getattr(epilog, {"eval": "EVAL_EXAMPLES", "generate": "GENERATE_EXAMPLES"}.get(command, "EXAMPLES"))
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    shown = {line.strip() for line in result.output.splitlines()}
    wanted = [line.strip() for line in (examples or "").splitlines() if line.strip() and line.strip() != "\b"]
    assert wanted, f"{command} has examples"
    missing = [line for line in wanted if line not in shown]
    assert not missing, missing
