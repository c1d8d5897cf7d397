"""A backup's scratch directory (sealed rows, in RAM on /dev/shm when there is room) does not outlive a
process that died mid-backup: the next backup removes it, and never one of a live process."""
from __future__ import annotations

import os
import subprocess
import sys

from server.backup.image import remove_orphans, scratch_dir


def test_orphaned_scratch_of_a_dead_process_is_removed_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    orphan = tmp_path / f".skm-backup-{dead_pid}-abc123"
    live = tmp_path / f".skm-backup-{os.getpid()}-def456"
    other = tmp_path / "skm-backup-notapid"
    for d in (orphan, live, other):
        d.mkdir(mode=0o700)
        (d / "image").write_bytes(b"sealed rows")
    assert remove_orphans(tmp_path) == [orphan]
    assert not orphan.exists() and live.exists() and other.exists()

    # A new scratch directory beside the database cleans up first, and names this process.
    (tmp_path / f".skm-backup-{dead_pid}-zzz999").mkdir()
    made = scratch_dir(1 << 40, tmp_path)          # too big for /dev/shm: beside the database
    assert made.parent == tmp_path and made.name.startswith(f".skm-backup-{os.getpid()}-")
    assert not (tmp_path / f".skm-backup-{dead_pid}-zzz999").exists()
    assert oct(made.stat().st_mode & 0o777) == "0o700"
