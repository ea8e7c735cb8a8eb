import subprocess
import sys
from pathlib import Path

from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_compare_writes_a_table_and_a_plot_for_every_method(tmp_path) -> None:
    config = tiny_config(tmp_path, rounds=2)
    out = tmp_path / "cmp"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "compare.py"),
            "--config",
            str(config),
            "--methods",
            "pfedmoe",
            "standalone",
            "--output",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    table = (out / "comparison.md").read_text().splitlines()
    assert table[0].startswith("| method | final mean acc | best mean acc | best round | rounds to 0.95 | bytes up")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["pfedmoe", "standalone"]
    assert table[3].split("|")[6].strip() == "0 B"  # Standalone sends nothing
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
