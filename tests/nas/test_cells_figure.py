"""``cells.png`` goes through snexp's recorded writer (issue 20, item 6).

Rule: every file snexp writes in a run directory is listed in its ``.snexp-run`` stamp, so
``--overwrite`` sets the old run's figure aside with the rest of it (a killed new run never
shows the old architecture), and the figure is written atomically, never through a link.
"""

from __future__ import annotations

import stat

from nas.draw import save_cells
from nas.space import Architecture
from snexp.runtime.marker import owned_entries, read_marker, write_marker

ARCH = Architecture.from_flat([0, 0, 1, 4, 0, 2, 1, 3] * 2)


def test_cells_png_is_recorded_as_the_runs_output(tmp_path):
    write_marker(tmp_path, "nas-search")
    save_cells(ARCH, tmp_path / "cells.png")
    assert read_marker(tmp_path)["outputs"] == ["cells.png"]
    assert owned_entries(tmp_path) == ([".snexp-run", "cells.png"], [])
    assert (tmp_path / "cells.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_cells_png_never_writes_through_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("KEEP\n")
    run = tmp_path / "run"
    run.mkdir()
    # The old fixed temporary name, and the figure's own name, planted as links.
    (run / ".cells.png.tmp.png").symlink_to(victim)
    (run / "cells.png").symlink_to(victim)
    save_cells(ARCH, run / "cells.png")
    assert victim.read_text() == "KEEP\n"
    assert stat.S_ISREG((run / "cells.png").lstat().st_mode)
