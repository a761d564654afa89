"""Every figure module runs with ``quick=True``, writes a non-empty PNG, and has a one-line caption; the CLI writes
CAPTIONS.md. (Figures are regenerated in full by ``python -m figures``; this only checks that each still runs.)"""
from pathlib import Path

import numpy as np
import pytest

import figures

MODULES = figures.load_all()


def test_registry_not_empty():
    assert len(MODULES) >= 1


@pytest.mark.parametrize("name", sorted(MODULES))
def test_figure_quick(name, tmp_path):
    mod = MODULES[name]
    assert isinstance(mod.CAPTION, str) and mod.CAPTION.strip() and "\n" not in mod.CAPTION
    out = Path(mod.make(tmp_path, np.random.default_rng(0), True))
    assert out.exists() and out.suffix == ".png" and out.parent == tmp_path
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_cli_writes_captions(tmp_path):
    from figures.__main__ import main

    name = sorted(MODULES)[0]
    assert main(["--list"]) == 0
    with pytest.raises(SystemExit):
        main(["--only", "no_such_figure", "--out", str(tmp_path)])
    assert main(["--only", name, "--out", str(tmp_path), "--quick"]) == 0
    assert (tmp_path / f"{name}.png").exists()
    caps = (tmp_path / "CAPTIONS.md").read_text()
    for n, mod in MODULES.items():
        assert f"{n}.png" in caps and mod.CAPTION in caps
