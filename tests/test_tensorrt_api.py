"""The TensorRT names crn_fast uses (export.tensorrt.TENSORRT_API) exist in the compiled bindings
of TensorRT 10.x and 11.x, and the weak-typing names that 11.x removed really are gone there.

The ``tensorrt-cu12-bindings`` wheels install without TensorRT's libraries, so the compiled module
cannot be imported here; the names a pybind11 module exposes are null-terminated strings in its
string table, which is what is read. Enum members (upper case) must appear as whole strings;
other names may share their tail with a longer string (the linker merges suffixes: "Logger" lives
inside "ILogger"). Downloads the two wheels (about 1.3 MB each) from the package index; skipped,
with the reason, when it cannot be reached.
"""
import subprocess
import sys
import zipfile

import pytest

from crn_fast.export.tensorrt import REMOVED_IN_11, TENSORRT_API

VERSIONS = {"10.x": "tensorrt-cu12-bindings>=10.12,<11", "11.x": "tensorrt-cu12-bindings>=11,<12"}


@pytest.fixture(scope="module")
def bindings(tmp_path_factory):
    out = {}
    for major, spec in VERSIONS.items():
        d = tmp_path_factory.mktemp(major.replace(".", ""))
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                            "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-d", str(d), spec],
                           capture_output=True, text=True, timeout=300)
        wheels = list(d.glob("*.whl"))
        if r.returncode or not wheels:
            pytest.skip(f"cannot download {spec} (offline?): {r.stderr.strip().splitlines()[-1:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            so = next(n for n in z.namelist() if n.endswith(".so") and "tensorrt" in n.split("/")[-1])
            out[major] = (wheels[0].name, z.read(so))
    return out


def has(blob: bytes, name: str) -> bool:
    if name.isupper() or name.startswith("__"):
        return b"\x00" + name.encode() + b"\x00" in blob
    return name.encode() + b"\x00" in blob


@pytest.mark.parametrize("major", list(VERSIONS))
def test_every_name_crn_fast_uses_is_in_the_bindings(bindings, major):
    wheel, blob = bindings[major]
    missing = [f"{owner}.{n}" for owner, names in TENSORRT_API.items() for n in names
               if n != "__version__" and not has(blob, n)]
    assert not missing, f"{wheel} lacks {missing}"
    assert all(has(blob, owner) for owner in TENSORRT_API if owner != "tensorrt")


def test_the_weak_typing_flags_are_gone_in_11_and_present_in_10(bindings):
    assert all(has(bindings["10.x"][1], n) for n in REMOVED_IN_11)
    assert not any(has(bindings["11.x"][1], n) for n in REMOVED_IN_11), bindings["11.x"][0]
