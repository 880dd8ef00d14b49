"""`python -m wingspan ...`, as torchrun and Fabric's launcher start each process."""

from wingspan.console import main

main()
