"""Build backend: setuptools' own, plus the start-up hook's ``.pth`` file in every wheel.

A ``.pth`` file must sit at the top of site-packages, which setuptools only
fills with packages and modules. Editable wheels (``pip install -e .``) do
not even contain the packages, only an import finder, so no build step of
setuptools can place the file in both kinds of wheel. This backend therefore
lets setuptools build the wheel, then adds ``paddleclas_mc_hook.pth`` to it
with its line in the wheel's ``RECORD``. pip installs it with the package and
removes it on ``pip uninstall``.

Every other hook (``build_sdist``, ``get_requires_for_build_wheel`` and so on)
is setuptools' ``build_meta`` unchanged.
"""

import base64
import hashlib
import os
import tempfile
import zipfile

from setuptools import build_meta as _setuptools_backend
from setuptools.build_meta import *  # noqa: F401,F403 - re-export the other PEP 517 hooks

# The name sorts after setuptools' "__editable__.*.pth", so in an editable
# install the package is importable by the time this line runs.
PTH_NAME = "paddleclas_mc_hook.pth"

# site.py executes .pth lines that start with "import". The hook imports only
# the standard library until PaddleClas's engine module is imported.
PTH_LINE = ("import paddleclas_mc.integration.hook; "
            "paddleclas_mc.integration.hook.install_if_enabled()\n")


def _record_entry(name, data):
    """Return the wheel RECORD line of a file: path, urlsafe sha256 without padding, size."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
    return f"{name},sha256={digest},{len(data)}\n"


def _find_record(names, wheel_path):
    records = [entry for entry in names
               if entry.endswith(".dist-info/RECORD") and entry.count("/") == 1]
    if len(records) != 1:
        raise ValueError(f"{wheel_path}: expected one *.dist-info/RECORD, found {records}.")
    return records[0]


def add_file_to_wheel(wheel_path, name, data):
    """Add a file at the top of a wheel and list it in the wheel's RECORD.

    The wheel is rewritten to a temporary file next to it, which then
    replaces it. A wheel that already contains ``name`` is left unchanged.

    Args:
        wheel_path: path of the ``.whl`` file.
        name: file name inside the wheel, e.g. ``paddleclas_mc_hook.pth``.
        data: the file's contents, as bytes.

    Raises:
        ValueError: when the wheel has no ``*.dist-info/RECORD``.
    """
    directory = os.path.dirname(os.path.abspath(wheel_path))
    handle, temporary_path = tempfile.mkstemp(suffix=".whl", dir=directory)
    os.close(handle)
    try:
        with zipfile.ZipFile(wheel_path) as source:
            if name in source.namelist():
                return
            record_name = _find_record(source.namelist(), wheel_path)
            record_info = source.getinfo(record_name)
            record = source.read(record_name).decode("utf-8")
            if record and not record.endswith("\n"):
                record += "\n"

            # PEP 427 encourages archivers to put the .dist-info files at the
            # end, so the new file goes in before them and RECORD stays last.
            dist_info = record_name.split("/")[0] + "/"
            entries = source.infolist()
            with zipfile.ZipFile(temporary_path, "w", zipfile.ZIP_DEFLATED) as target:
                for info in entries:
                    if not info.filename.startswith(dist_info):
                        target.writestr(info, source.read(info))
                added = zipfile.ZipInfo(name, date_time=record_info.date_time)
                added.compress_type = zipfile.ZIP_DEFLATED
                added.external_attr = 0o644 << 16
                target.writestr(added, data)
                for info in entries:
                    if info.filename.startswith(dist_info) and info.filename != record_name:
                        target.writestr(info, source.read(info))
                target.writestr(record_info, record + _record_entry(name, data))
        os.replace(temporary_path, wheel_path)
    finally:
        if os.path.exists(temporary_path):
            os.remove(temporary_path)


def _add_hook(wheel_directory, wheel_name):
    add_file_to_wheel(os.path.join(wheel_directory, wheel_name), PTH_NAME,
                      PTH_LINE.encode("utf-8"))
    return wheel_name


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    """Build the wheel with setuptools, then add the start-up hook's ``.pth`` file."""
    wheel_name = _setuptools_backend.build_wheel(wheel_directory, config_settings,
                                                 metadata_directory)
    return _add_hook(wheel_directory, wheel_name)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    """Build the editable wheel with setuptools, then add the ``.pth`` file."""
    wheel_name = _setuptools_backend.build_editable(wheel_directory, config_settings,
                                                    metadata_directory)
    return _add_hook(wheel_directory, wheel_name)
