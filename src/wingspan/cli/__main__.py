"""`python -m wingspan.cli ...`: as `wingspan ...`."""

from wingspan.console import main

main()
