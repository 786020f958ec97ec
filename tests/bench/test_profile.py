"""The profile target's own logic: py-spy's command lines, its sample count,
and reading collapsed stacks into the functions with the most samples.

Pure and fast, but for one recording of a small busy script, skipped where
py-spy is not installed or may not attach.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import profile
from bench.profile import Profile, Scenario, function_of

# -- py-spy's command lines and output --------------------------------------------


def test_a_recording_samples_the_gil_holders_at_250_hz_for_the_given_seconds() -> None:
    command = profile.record_command("/venv/bin/py-spy", 4242, 20, Path("out/x.svg"))

    def value(option: str) -> str:
        return command[command.index(option) + 1]

    assert command[:2] == ["/venv/bin/py-spy", "record"]
    assert (value("--pid"), value("--rate"), value("--duration")) == ("4242", "250", "20")
    assert value("--output") == "out/x.svg"
    assert "--gil" in command
    assert "--idle" not in command
    assert "--subprocesses" not in command  # carpool is one process


def test_the_output_suffix_picks_collapsed_stacks_or_a_flame_graph() -> None:
    def form(name: str) -> str:
        command = profile.record_command("py-spy", 1, 1, Path(name))
        return command[command.index("--format") + 1]

    assert form("a.folded") == "raw"
    assert form("a.svg") == "flamegraph"


def test_file_names_carry_the_date_the_label_and_the_scenario() -> None:
    http, ws = profile.SCENARIOS
    assert http.stem("2026-12-01", "before") == "2026-12-01-before-tiny-http-c128"
    assert ws.stem("2026-12-01", "") == "2026-12-01-tiny-ws-128"
    assert (http.transport, http.concurrency) == ("http", 128)
    assert (ws.transport, ws.concurrency) == ("ws", 128)
    assert "128 connections" in http.describe()
    assert "128 requests in flight" in Scenario("x", "ws", 128).describe()


def test_the_sample_count_is_read_from_what_py_spy_printed_last() -> None:
    said = (
        "py-spy> Sampling process 250 times a second for 20 seconds.\n"
        "py-spy> Wrote raw flamegraph data to 'x.folded'. Samples: 4998 Errors: 3\n"
    )
    assert profile.sample_counts(said) == (4998, 3)
    with pytest.raises(RuntimeError, match="no sample count"):
        profile.sample_counts("Error: Permission Denied\n")


def test_carpool_s_stream_deadline_is_put_past_the_recording() -> None:
    options = profile.Options(Path("."), Path("out"), 20, "")
    assert float(profile.server_env(options)["CARPOOL_HEADER_TIMEOUT"]) > 20 + 5


# -- reading collapsed stacks -----------------------------------------------------


def test_a_function_is_its_name_and_file_whatever_line_was_running() -> None:
    assert function_of("send (uvicorn/protocols/http/httptools_impl.py:412)") == (
        "send (uvicorn/protocols/http/httptools_impl.py)"
    )
    assert function_of("<module> (<string>:8)") == "<module> (<string>)"
    assert function_of("select") == "select"


def test_own_samples_go_to_the_top_of_each_stack_summed_over_lines() -> None:
    folded = (
        "run (loop.py:10);decode (req.py:3) 30\n"
        "run (loop.py:10);decode (req.py:5) 10\n"
        "run (loop.py:10);encode (resp.py:7);decode (req.py:3) 20\n"
        "run (loop.py:12) 5\n"
    )
    profile = Profile.of(folded)
    assert profile.samples == 65
    assert profile.own == {"decode (req.py)": 60, "run (loop.py)": 5}


def test_total_samples_count_a_function_once_per_stack_even_when_it_recurses() -> None:
    folded = "a (m.py:1);b (m.py:2);a (m.py:1);b (m.py:3) 4\na (m.py:1) 6\n"
    profile = Profile.of(folded)
    assert profile.total == {"a (m.py)": 10, "b (m.py)": 4}
    assert profile.own == {"b (m.py)": 4, "a (m.py)": 6}


def test_frames_with_spaces_and_lines_that_are_no_stacks_are_read_right() -> None:
    folded = "<module> (my app.py:1);f (x.py:2) 3\n\nnot a stack\n"
    profile = Profile.of(folded)
    assert profile.samples == 3
    assert profile.own == {"f (x.py)": 3}
    assert profile.total["<module> (my app.py)"] == 3


def test_the_table_lists_the_top_functions_by_own_samples_with_their_shares() -> None:
    folded = "main (m.py:1);a (m.py:2) 50\nmain (m.py:1);b (m.py:3) 30\nmain (m.py:1) 20\n"
    lines = Profile.of(folded).table(top=2)
    assert lines[0].split() == ["own", "own", "%", "total", "%", "function"]
    assert lines[1].split() == ["50", "50.0%", "50.0%", "a", "(m.py)"]
    assert lines[2].split() == ["30", "30.0%", "30.0%", "b", "(m.py)"]
    assert len(lines) == 3
    assert Profile.of("").table() == [lines[0]]


# -- one real recording -------------------------------------------------------------

_BUSY = """
import time
def spin():
    total = 0
    for i in range(100_000):
        total += i
    return total
end = time.monotonic() + 20
print("ready", flush=True)
while time.monotonic() < end:
    spin()
"""


@pytest.mark.parametrize("suffix", [".folded", ".svg"])
def test_py_spy_records_a_busy_script(tmp_path: Path, suffix: str) -> None:
    try:
        spy = profile.py_spy()
    except RuntimeError:
        pytest.skip("py-spy is not installed (the bench extra)")
    output = tmp_path / f"busy{suffix}"
    with subprocess.Popen([sys.executable, "-c", _BUSY], stdout=subprocess.PIPE, text=True) as busy:
        try:
            assert busy.stdout is not None
            assert busy.stdout.readline() == "ready\n"
            done = subprocess.run(
                profile.record_command(spy, busy.pid, 1, output),
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            busy.kill()
    said = done.stdout + done.stderr
    if done.returncode != 0 and "ermission" in said:
        pytest.skip(f"py-spy may not attach here: {said.strip()[-200:]}")
    assert done.returncode == 0, said
    samples, _ = profile.sample_counts(said)
    assert samples > 0
    if suffix == ".folded":
        recorded = Profile.of(output.read_text())
        assert recorded.samples == samples
        assert recorded.own.most_common(1)[0][0] == "spin (<string>)"
    else:
        assert output.read_text().lstrip().startswith("<?xml")
        assert "spin (&lt;string&gt;:" in output.read_text()
