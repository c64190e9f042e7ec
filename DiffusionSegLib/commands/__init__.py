"""Subcommands of the ``diffusionseg`` command line, one module each (``add_arguments`` + ``run``)."""
