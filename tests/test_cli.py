import subprocess
import sys

from kvarn import cli


def test_info_lists_every_preset_with_capacity(capsys):
    assert cli.main(["info", "--head-dim", "128"]) == 0
    out = capsys.readouterr().out
    assert "kvarn_k4v2_g128" in out and "4.74x" in out and "(default)" in out
    assert "kvarn_k2v2_g64" in out and "6.24x" in out


def test_check_prints_the_summary_line_and_exit_status():
    run = subprocess.run(
        [sys.executable, "-m", "kvarn.cli", "check", "--tiles", "2", "--presets",
         "kvarn_k4v2_g64", "--head-dims", "64", "--dtypes", "bfloat16"],
        capture_output=True, text=True, timeout=900)
    last = run.stdout.strip().splitlines()[-1]
    assert last == "kvarn check: implementations=4 tiles=22 mismatched_bytes=0", run.stdout + run.stderr
    assert run.returncode == 0


def test_import_kvarn_loads_no_framework():
    code = "import sys, kvarn, kvarn.check, kvarn.oracle, kvarn.cli; " \
           "assert 'jax' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bundled_prose_matches_its_hash():
    from kvarn_jax import demo

    text = demo.bundled_prose()
    assert len(text) > 90_000 and text.startswith('The "assert" statement')
