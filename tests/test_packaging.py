"""The wheel holds every subpackage: build it, install it in a clean venv, import every plugin."""

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_imports_every_builtin_plugin(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-w", str(dist), "-q"], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next(dist.glob("lscape-*.whl"))
    env_dir = tmp_path / "venv"
    # system site packages give torch & co; the wheel's lscape shadows the editable one
    venv.create(env_dir, with_pip=False, system_site_packages=True)
    py = env_dir / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    code = (
        "import importlib, lscape, lscape.manager as m\n"
        f"assert lscape.__file__.startswith({str(env_dir)!r}), lscape.__file__\n"
        "for name in m.BUILTIN_PLUGINS: importlib.import_module(name)\n"
        "reg = m.build_registry(m.get_plugin_manager(entry_points=False))\n"
        "print(len(reg.activatable()), 'plugins')\n"
    )
    check = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "plugins" in check.stdout
