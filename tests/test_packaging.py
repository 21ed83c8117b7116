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
    # The new venv sees this interpreter's site-packages (torch & co) through a .pth file,
    # whether the tests run in a venv or the system Python (system_site_packages would give
    # the *base* interpreter's, which a venv user's torch is not in); the wheel's lscape,
    # installed into the new venv's own site-packages, comes first on sys.path.
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    own = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    outer = [p for p in sys.path if p.endswith("site-packages")]
    (Path(own) / "zz_outer.pth").write_text("\n".join(outer) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                              "--target", own, str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    code = (
        "import importlib, lscape, lscape.manager as m\n"
        f"assert lscape.__file__.startswith({str(env_dir)!r}), lscape.__file__\n"
        "for name in m.BUILTIN_PLUGINS: importlib.import_module(name)\n"
        "import lscape.optim, lscape.session, lscape.integrations._common  # the attach API's subpackage\n"
        "reg = m.build_registry(m.get_plugin_manager(entry_points=False))\n"
        "print(len(reg.activatable()), 'plugins')\n"
    )
    check = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "plugins" in check.stdout
