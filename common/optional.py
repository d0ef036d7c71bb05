"""Optional dependencies: imported where they are used, refused with one message naming the fix."""
import importlib
from types import ModuleType


def require(module: str, needed_for: str, extra: str) -> ModuleType:
  """Imports `module`, or raises an ImportError that says what needs it and how to install it.

  Args:
    module: the module's import name (also its pip name).
    needed_for: what needs it, as the start of a sentence ('Training finite-width networks').
    extra: the ntkdd extra that installs it ('train' for `pip install ntkdd[train]`).

  Returns:
    The imported module.
  """
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f'{needed_for} needs {module}: `pip install {module}` (or `pip install '
                      f'ntkdd[{extra}]`).') from e
