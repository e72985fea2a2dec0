"""The ``blip2`` command line (``main``): ``run`` (``run.py``), ``convert`` (``convert.py``), ``demo`` (``demo.py``)."""

from blip2.cli.main import USER_ERRORS, build_parser, main
from blip2.cli.run import cmd_run, load_run_config

__all__ = ["main", "build_parser", "load_run_config", "cmd_run", "USER_ERRORS"]
