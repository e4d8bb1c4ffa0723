"""The allocator setting is made in processes the bridge owns (the CLI's ``main``, ingest
workers) and never by the library in a caller's process."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from replay_bridge import allocator
from replay_bridge import cli


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_it_sets_glibc_thresholds_in_a_process_of_its_own():
    code = "from replay_bridge.allocator import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "True"


def test_it_changes_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert allocator.keep_freed_memory() is False


def test_the_cli_entry_point_sets_it_and_the_library_does_not(monkeypatch, tmp_path, tiny):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("cli") or True)
    monkeypatch.setattr(allocator.ctypes, "CDLL",
                        lambda *a: pytest.fail("the library set the allocator in-process"))
    from replay_bridge.ingest import ingest

    (tmp_path / "empty.jsonl").write_bytes(b"\n")
    ingest(tmp_path / "empty.jsonl", tiny, "sglang", tmp_path / "out")
    monkeypatch.setattr(sys, "argv", ["replay-bridge", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == ["cli"]
