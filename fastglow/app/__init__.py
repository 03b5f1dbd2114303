"""The training application (the ``fastglow`` command): data sets, the training loop, checkpoints, processes.

It uses the library (``fastglow.Glow``, ``fastglow.reference``); the library never imports it.
"""
