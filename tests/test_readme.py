"""The README's Python examples run as they are written: each ```python block of README.md is
saved to a file and run by a fresh interpreter, unless the line just before the block is
``<!-- not run: reason -->`` (for a fragment that needs code around it)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

import distsrv

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
TIMEOUT = 60
# Where the distsrv under test was imported from, ahead of any other on the child's path.
DISTSRV_PATH = str(pathlib.Path(distsrv.__file__).resolve().parent.parent)
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>\S.*?) -->")


@dataclass(frozen=True)
class Block:
    """A fenced ```python block: the line of its opening fence (from 1), its code, and why it is
    not run (None: it is run)."""

    line: int
    code: str
    not_run: str | None


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, in order. A fence opens with ``` and an info
    string and closes with a bare ```, so a fence shown inside another block is not one."""
    lines = text.splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        opening = lines[index].strip()
        if not opening.startswith("```"):
            index += 1
            continue
        end = next((j for j in range(index + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"the block at line {index + 1} is never closed"
        if opening[3:].strip() == "python":
            marker = NOT_RUN.fullmatch(lines[index - 1].strip()) if index else None
            blocks.append(
                Block(
                    line=index + 1,
                    code="\n".join(lines[index + 1 : end]) + "\n",
                    not_run=marker["reason"] if marker else None,
                )
            )
        index = end + 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def run(code: str, directory: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """``code`` saved as ``example.py`` in ``directory`` and run there, as a reader would, with
    the distsrv under test and without this process's cluster or security; fails the test past
    ``TIMEOUT``."""
    script = directory / "example.py"
    script.write_text(code, encoding="utf-8")
    env = {
        name: value
        for name, value in os.environ.items()
        if name != "TF_CONFIG" and not name.startswith("DISTSRV_")
    }
    env["PYTHONPATH"] = os.pathsep.join(
        path for path in (DISTSRV_PATH, os.environ.get("PYTHONPATH")) if path
    )
    try:
        return subprocess.run(
            [sys.executable, str(script)],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as expired:
        # The child is killed; what it wrote so far may be bytes, even with text=True.
        stderr: bytes | str | None = expired.stderr
        if isinstance(stderr, bytes):
            stderr = stderr.decode(errors="replace")
        pytest.fail(f"not done within {TIMEOUT} s; stderr:\n{stderr or ''}")


def test_python_blocks_are_found_and_markers_read() -> None:
    text = "\n".join(
        [
            "Intro.",
            "```python",
            "print(1)",
            "```",
            "<!-- not run: needs a cluster -->",
            "```python",
            "server.stop()",
            "```",
            "```text",
            "```python",
            "```",
            "<!-- not run: a marker before another language marks nothing -->",
            "```sh",
            "ls",
            "```",
            "```python",
            "x = 1",
            "",
            "print(x)",
            "```",
        ]
    )
    assert python_blocks(text) == [
        Block(line=2, code="print(1)\n", not_run=None),
        Block(line=6, code="server.stop()\n", not_run="needs a cluster"),
        Block(line=16, code="x = 1\n\nprint(x)\n", not_run=None),
    ]


def test_the_readme_opens_with_a_runnable_example() -> None:
    assert BLOCKS, "README.md has no ```python block"
    assert BLOCKS[0].not_run is None, f"the first example is marked: {BLOCKS[0].not_run}"


def test_every_not_run_marker_marks_a_python_block_and_says_why() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    markers = [number for number, line in enumerate(lines, 1) if "<!-- not run" in line]
    marked = {block.line - 1 for block in BLOCKS if block.not_run is not None}
    assert set(markers) == marked, (
        f"markers on lines {markers}, of which only {sorted(marked)} precede a ```python block "
        "and read '<!-- not run: reason -->'"
    )


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line {block.line}" for block in BLOCKS])
def test_example_runs(block: Block, tmp_path: pathlib.Path) -> None:
    if block.not_run is not None:
        pytest.skip(f"README.md line {block.line} is not run: {block.not_run}")
    result = run(block.code, tmp_path)
    assert result.returncode == 0, f"README.md line {block.line}:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr


def test_the_first_example_prints_what_its_comments_say(tmp_path: pathlib.Path) -> None:
    result = run(BLOCKS[0].code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "task 1 received [0. 1. 2. 3.]",
        "[array([3., 3., 3.]), array([3., 3., 3.])]",
    ]
