"""Runs tests/multidevice_checks.py in a fresh process with 8 simulated CPU devices."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_multidevice_checks_pass():
    env = dict(
        os.environ, JAX_NUM_CPU_DEVICES='8', JAX_PLATFORMS='cpu'
    )
    proc = subprocess.run(
        [sys.executable, '-m', 'tests.multidevice_checks'],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'multidevice checks passed' in proc.stdout
