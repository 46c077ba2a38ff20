"""``python -m jvpgraph ...`` (and ``torchrun --nproc_per_node 2 -m jvpgraph train ...``): the command line."""

from .cli import console

console()
