import json
import os
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


TOY_METHOD = '''
"""A toy method for the test: clients share nothing but the bias of their head."""

from fedmoe_pl.algorithms import Algorithm, ClientContext, ModelClient


class BiasClient(ModelClient):
    """Uploads the bias of its head; takes the server's average in its place."""

    def upload(self):
        return {"bias": self.model.head.bias.detach().clone()}

    def download(self, payload):
        self.model.head.bias.data.copy_(payload["bias"])


class SharedBias(Algorithm):
    """Average the clients' head biases by sample count."""

    def build_client(self, ctx: ClientContext) -> BiasClient:
        return BiasClient(ctx, ctx.build())
'''


def test_a_new_method_is_one_module_and_one_overlay(tmp_path) -> None:
    (tmp_path / "toy_method.py").write_text(TOY_METHOD)
    methods = tmp_path / "methods"
    methods.mkdir()
    (methods / "toy.yaml").write_text("algorithm:\n  class_path: toy_method.SharedBias\n")
    out = tmp_path / "cmp"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    config = tiny_config(tmp_path, rounds=2)
    script = str(ROOT / "experiments" / "compare.py")
    subprocess.run(
        [sys.executable, script, "--config", str(config), "--methods-dir", str(methods), "--output", str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
        env=env,
    )
    rows = (out / "comparison.md").read_text().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["toy"]  # discovered from the overlay alone
    assert rows[0].split("|")[6].strip() == "72 B"  # 3 clients x 6 classes x 4 bytes per round
    summary = json.loads((out / "toy" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
