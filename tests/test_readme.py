"""The README runs as written: CI runs its test command, and its walkthroughs run verbatim."""

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.endswith("pytest")
    assert ci in (ROOT / "README.md").read_text()


def _raw_block(section: str) -> str:
    """The text of the first code block after a README heading (or phrase)."""
    text = (ROOT / "README.md").read_text().split(section, 1)[1]
    return text.split("```", 2)[1].split("\n", 1)[1]


def _block(section: str) -> list[str]:
    """The first code block after a README heading, as commands (continuations joined)."""
    commands, current = [], ""
    for line in _raw_block(section).splitlines():
        current += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            if current.strip() and not current.lstrip().startswith("#"):
                commands.append(current.strip())
            current = ""
    return commands


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory, tiny_dirs) -> Path:
    """The README's fine-tune / compress / inspect / recommend / materialize commands,
    run verbatim on the tiny model in a fresh working directory (returned)."""
    from server.cli import main

    commands = _block("## Compress, inspect, recommend, materialize")
    assert commands[0].startswith("BASE=") and len(commands) >= 6
    work = tmp_path_factory.mktemp("readme")
    here = os.getcwd()
    os.chdir(work)
    try:
        for command in commands[1:]:
            argv = shlex.split(command.replace("$BASE", str(tiny_dirs["base"])), comments=True)
            assert argv[0] == ".venv/bin/deltaserve", command
            assert main(argv[1:]) == 0, command
    finally:
        os.chdir(here)
    return work


def test_the_compress_walkthrough_runs_as_written(walkthrough):
    assert (walkthrough / "support-bot.delta.safetensors").is_file()
    assert (walkthrough / "support-bot-hf" / "model.safetensors").is_file()


def test_the_admin_walkthrough_runs_as_written(walkthrough, tiny_dirs, tmp_path):
    """The README's upload / query / list / pin / cache / delete commands, verbatim
    through curl and bash, against a live server on the tiny base that holds the token
    the README exports; only the address is the test server's."""
    import shutil

    from server.app import ThreadedServer
    from tests.server.conftest import make_settings

    if shutil.which("curl") is None:
        pytest.skip("the README's commands use curl, which is not installed")
    script = _raw_block("never logged.")
    first, rest = script.split("\n", 1)
    assert first.startswith("export DELTASERVE_ADMIN_TOKEN=")
    token = first.split("=", 1)[1]
    curls = [line for line in rest.splitlines() if line.startswith("curl ")]
    assert len(curls) >= 5
    store = tmp_path / "store"
    store.mkdir()
    srv = ThreadedServer(make_settings(tiny_dirs["base"], store, admin_token=token))
    try:
        srv.wait_ready()
        res = subprocess.run(
            ["bash", "-e", "-c", script.replace("http://127.0.0.1:8000", srv.url)],
            cwd=walkthrough,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
        replies, out, pos = [], res.stdout, 0
        decoder = json.JSONDecoder()
        while out[pos:].strip():
            pos += len(out[pos:]) - len(out[pos:].lstrip())
            body, pos = decoder.raw_decode(out, pos)
            replies.append(body)
        assert len(replies) == len(curls), out  # one JSON body per command
        for command, body in zip(curls, replies, strict=True):
            assert "error" not in body, (command, body)
        completion = next(b for b in replies if "choices" in b)
        assert completion["model"] == "support-bot"
        assert completion["choices"][0]["message"]["role"] == "assistant"
        assert "support-bot" in json.dumps(replies[2])  # the listing
        assert "-X DELETE" in curls[-1]
        assert not (store / "support-bot.delta.safetensors").exists()
    finally:
        srv.stop()


def test_the_vllm_walkthrough_runs_as_written(tiny_dirs, offline_hub, tmp_path):
    """The README's block for vLLM users, verbatim through bash and curl: a base by Hub
    id (a tiny model laid out under that id in an offline Hub cache), a LoRA adapter
    made by `finetune`, loaded, queried (with `response_format` too) and unloaded
    through vLLM's routes. Only the address is the test's."""
    import contextlib
    import shutil
    import signal
    import sys

    from tests.conftest import free_port, lay_out_hub

    if shutil.which("curl") is None:
        pytest.skip("the README's commands use curl, which is not installed")
    script = _raw_block("## Coming from vLLM")
    hub_id = next(w for w in script.split() if w.count("/") == 1 and w[0].isupper())
    lay_out_hub(offline_hub, hub_id, tiny_dirs["base"])
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.executable).parent.parent)  # .venv/bin/deltaserve
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DELTASERVE_PORT": str(port), "DELTASERVE_STORE": str(work / "store")}
    out, err = (tmp_path / "out").open("w+"), (tmp_path / "err").open("w+")
    proc = subprocess.Popen(
        ["bash", "-e", "-c", script.replace("http://127.0.0.1:8000", url)],
        cwd=work,
        env=env,
        stdout=out,
        stderr=err,
        start_new_session=True,  # the server it starts in the background, stopped below
    )
    try:
        assert proc.wait(timeout=600) == 0, Path(err.name).read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    text = Path(out.name).read_text()
    assert "Success: LoRA adapter 'support-bot' added successfully." in text
    assert "Success: LoRA adapter 'support-bot' removed successfully." in text
    decoder = json.JSONDecoder()
    bodies = []
    pos = text.find("{")
    while pos != -1:
        body, end = decoder.raw_decode(text, pos)
        bodies.append(body)
        pos = text.find("{", end)
    listed = next(b for b in bodies if b.get("object") == "list")
    assert [m["id"] for m in listed["data"]] == [hub_id]
    chat, held = [b for b in bodies if "choices" in b]
    assert chat["model"] == "support-bot" and chat["choices"][0]["message"]["content"]
    # response_format: JSON under the schema, from a tiny model that knows no JSON
    assert held["choices"][0]["finish_reason"] == "stop", held
    answer = json.loads(held["choices"][0]["message"]["content"])
    assert set(answer) == {"name", "age", "city"} and 0 <= answer["age"] <= 150
    assert isinstance(answer["name"], str) and isinstance(answer["city"], str)
    assert not (work / "store" / "support-bot.delta.safetensors").exists()  # unloaded
    assert (work / "adapters" / "support-bot" / "adapter_config.json").is_file()
