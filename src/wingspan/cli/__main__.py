"""`python -m wingspan.cli ...`: as `wingspan ...` (but Python imports this package, every
command, first: a Ctrl-C then is a traceback; `python -m wingspan` has none)."""

from wingspan.console import main

main()
