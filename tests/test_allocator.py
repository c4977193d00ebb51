"""The process keeps freed memory for the next tensor (``s2d.allocator``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import sys, torch
    from s2d.allocator import keep_freed_memory
    took = [keep_freed_memory(), keep_freed_memory()] if sys.argv[1] == "keep" else []
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    before = rss()
    x = torch.ones(64 * 2**20)  # 256 MiB, touched
    del x
    print(all(took), rss() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensor_memory_stays_in_the_process_for_the_next_tensor():
    """With glibc's defaults a freed 256 MiB tensor goes back to the kernel (the next one is page-faulted in
    again); kept, it stays. glibc accepts every setting (a value above its limits would be refused), twice."""
    kept = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        took, mib = out.stdout.split()
        kept[mode] = float(mib)
        assert took == "True"
    assert kept["default"] < 64 and kept["keep"] > 200, kept


def test_every_cli_command_keeps_freed_memory(monkeypatch):
    import s2d.cli as cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["zoo", "--json"]) == 0
    assert calls == [1]
