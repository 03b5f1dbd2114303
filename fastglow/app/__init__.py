"""The training application (the ``fastglow`` command): data sets, the training loop, checkpoints, processes.

It uses the library (``fastglow.Glow``, ``fastglow.reference``); the library never imports it.
"""

import importlib.util

APP_PACKAGES = {"PIL": "pillow", "tqdm": "tqdm", "sklearn": "scikit-learn"}  # import name -> the [app] extra's


def missing_app_packages() -> list[str]:
    """The distributions of the ``[app]`` extra that are not installed (looked up, not imported)."""
    def installed(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False
    return [dist for module, dist in APP_PACKAGES.items() if not installed(module)]
