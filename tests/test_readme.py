"""CI runs exactly the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.endswith("pytest")
    assert ci in (ROOT / "README.md").read_text()


def _block(section: str) -> list[str]:
    """The first code block after a README heading, as commands (continuations joined)."""
    text = (ROOT / "README.md").read_text().split(section, 1)[1]
    block = text.split("```", 2)[1].split("\n", 1)[1]
    commands, current = [], ""
    for line in block.splitlines():
        current += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            if current.strip() and not current.lstrip().startswith("#"):
                commands.append(current.strip())
            current = ""
    return commands


def test_the_compress_walkthrough_runs_as_written(tmp_path, tiny_dirs, monkeypatch):
    """The README's fine-tune / compress / inspect / recommend / materialize commands,
    verbatim, on the tiny model in a fresh working directory."""
    import shlex

    from server.cli import main

    commands = _block("## Compress, inspect, recommend, materialize")
    assert commands[0].startswith("BASE=") and len(commands) >= 6
    monkeypatch.chdir(tmp_path)
    for command in commands[1:]:
        argv = shlex.split(command.replace("$BASE", str(tiny_dirs["base"])), comments=True)
        assert argv[0] == ".venv/bin/deltaserve", command
        assert main(argv[1:]) == 0, command
    assert (tmp_path / "support-bot.delta.safetensors").is_file()
    assert (tmp_path / "support-bot-hf" / "model.safetensors").is_file()
