"""`python -m moepress` (and `torchrun -m moepress`) runs the CLI."""

from moepress.cli import main

main()
