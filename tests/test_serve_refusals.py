"""`ranking serve`'s refusals before it serves anything, in this process: one line and exit 2 for a taken port, a
folder that is not an index, flags out of bounds."""

from __future__ import annotations

import socket

from harness import cli_refusal


def test_a_taken_port_is_one_line_before_the_model_loads(tmp_path, capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = cli_refusal(capsys, "serve", "--index", str(tmp_path / "nothing-here"), "--port", str(port))
    assert line.startswith(f"ranking serve: error: --host 127.0.0.1 --port {port}: cannot listen (")


def test_a_folder_that_is_not_an_index_is_one_line(tmp_path, capsys):
    line = cli_refusal(capsys, "serve", "--index", str(tmp_path), "--port", "0")
    assert line == f"ranking serve: error: {tmp_path}: not an index folder (serve one written by `ranking index`)"


def test_flags_out_of_bounds_are_one_line(tmp_path, capsys):
    index = str(tmp_path)
    assert "--queue-size must be at least 1" in cli_refusal(capsys, "serve", "--index", index, "--queue-size", "0")
    assert "--top must be at most 100" in cli_refusal(capsys, "serve", "--index", index, "--top", "101")
    assert "--max-pixels must be at most" in cli_refusal(capsys, "serve", "--index", index, "--max-pixels", str(10**9))
    assert "--backend" in cli_refusal(capsys, "serve", "--index", index, "--backend", "annoy")
