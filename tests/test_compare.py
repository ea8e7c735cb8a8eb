import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compare_writes_a_table_and_a_plot_for_every_method(tmp_path) -> None:
    config = {
        "data": {
            "source": {
                "class_path": "fedmoe_pl.data.Synthetic",
                "init_args": {"num_classes": 4, "train_per_class": 24},
            },
            "partitioner": {"class_path": "fedmoe_pl.data.Pathological", "init_args": {"classes_per_client": 2}},
            "num_clients": 2,
            "batch_size": 16,
        },
        "client": {"zoo": ["cnn5"]},
        "federation": {"rounds": 2},
        "trainer": {"accelerator": "cpu"},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "cmp"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "compare.py"),
            "--config",
            str(tmp_path / "tiny.yaml"),
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
