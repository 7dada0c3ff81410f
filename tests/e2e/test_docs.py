"""The top README's examples run as written against the real agent serving the demo models:
each curl command of the tour, and the Python client example."""
import json
import re
import subprocess
from pathlib import Path

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def fenced(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def tour_commands() -> list[str]:
    """The curl commands of the README's tour (blocks that talk to the local agent)."""
    commands = []
    for block in fenced("sh"):
        if "curl" in block and "localhost:8000" in block:
            commands += [c.strip() for c in re.split(r"\n\s*\n", block) if c.strip()]
    return commands


def test_the_readme_tour_runs_as_written(agent):
    commands = tour_commands()
    assert len(commands) >= 4, commands
    host = agent.url.removeprefix("http://")
    for command in commands:
        out = subprocess.run(["bash", "-c", command.replace("localhost:8000", host)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (command, out.stderr)
        body = out.stdout.strip()
        assert body, command
        if body.startswith("data:"):
            events = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", body
            for e in events[:-1]:
                assert "error" not in json.loads(e), e
        else:
            assert "error" not in json.loads(body), (command, body)


def test_the_readme_python_example_runs_as_written(agent):
    (example,) = [b for b in fenced("python") if "OpenAI(" in b]
    code = example.replace("http://127.0.0.1:8000", agent.url)
    code += "\nassert r.choices[0].message.content and len(v) == 384\n"
    out = subprocess.run(["python3", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
