"""The sdist and the wheel hold the library only: vasso_jax/*.py and py.typed, no experiments."""

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]
SKIP = ('.git', '.venv', 'runs', 'build', 'dist', '*.egg-info', '__pycache__', '.*_cache')
BUILD = """
from setuptools import build_meta
sdist, wheel = build_meta.build_sdist('dist'), build_meta.build_wheel('dist')
print('BUILT', sdist, wheel)
"""


@pytest.fixture(scope='module')
def dists(tmp_path_factory):
    if int(setuptools.__version__.split('.')[0]) < 77:
        pytest.skip("needs setuptools>=77 (the dev extra): pip install 'setuptools>=77'")
    src = tmp_path_factory.mktemp('src') / 'repo'
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*SKIP))
    # In-process build backend, no isolation and no network: offline-safe, a few seconds.
    proc = subprocess.run(
        [sys.executable, '-c', BUILD],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    sdist_name, wheel_name = proc.stdout.split('BUILT')[-1].split()
    return src / 'dist' / sdist_name, src / 'dist' / wheel_name, proc.stderr


def library_files():
    return {f'vasso_jax/{p.name}' for p in (ROOT / 'vasso_jax').glob('*.py')} | {
        'vasso_jax/py.typed'
    }


def test_wheel_holds_the_library_only(dists):
    _, wheel, _ = dists
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {n for n in names if '.dist-info/' not in n}
    assert package == library_files()
    assert not any(n.startswith(('experiments', 'tests', 'docs')) for n in names)
    metadata = next(n for n in names if n.endswith('.dist-info/METADATA'))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert 'License-Expression: Apache-2.0' in text


def test_sdist_holds_the_library_and_build_files(dists):
    sdist, _, _ = dists
    with tarfile.open(sdist) as tar:
        names = {n.split('/', 1)[1] for n in tar.getnames() if '/' in n}
    assert library_files() <= names
    assert {'pyproject.toml', 'README.md'} <= names
    assert not any(n.startswith(('experiments/', 'tests/', 'docs/')) for n in names)


def test_build_has_no_license_deprecation_warning(dists):
    *_, stderr = dists
    assert 'project.license' not in stderr and 'License classifiers' not in stderr
