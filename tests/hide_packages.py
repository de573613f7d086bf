"""``python tests/hide_packages.py PKG[,PKG...] SCRIPT [ARGS...]``: run SCRIPT as on a machine where those packages are
not installed (no import finds them, ``importlib.util.find_spec`` returns None), e.g. the optional trackers."""

import importlib.util
import runpy
import sys

HIDDEN = set(sys.argv[1].split(","))
_find_spec = importlib.util.find_spec


def find_spec(name, package=None):
    return None if name.split(".")[0] in HIDDEN else _find_spec(name, package)


class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


importlib.util.find_spec = find_spec
sys.meta_path.insert(0, Hide())
sys.argv = sys.argv[2:]
sys.path[0] = sys.argv[0].rpartition("/")[0] or "."
runpy.run_path(sys.argv[0], run_name="__main__")
