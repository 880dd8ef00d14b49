"""The `wingspan` command: parses options, calls one library function, prints.

Every default comes from `wingspan.config`; all the work happens in the library. One module
per group of commands (data, train, runs, evaluate, predict, backbones, demo); what they
share is in `common` (consoles, helpers) and `options` (the options several commands take).
"""

# Imported to register their commands, in the order `wingspan --help` lists them.
from wingspan.cli import data, train, runs, evaluate, predict, backbones, demo  # noqa: F401, I001
from wingspan.cli.app import app, data_app, main, models_app, readable_help

readable_help(app, data_app, models_app)  # once every command is registered

__all__ = ["app", "data_app", "main", "models_app"]
