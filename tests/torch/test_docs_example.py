"""The PyTorch example of docs/methods.md runs and prints a line per method."""

import runpy
from pathlib import Path

EXAMPLE = Path(__file__).parents[2] / "docs" / "examples" / "choosing_torch.py"


def test_the_methods_example_runs(capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and all("‖θ − θ₀‖" in line for line in lines)
    names = [line.split("  ")[0].strip() for line in lines]
    assert names[:3] == ["adamw", "AdamFTP", "SGDFTP"] and "WiSE-FT (α=0.5)" in names
