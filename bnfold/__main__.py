"""``python -m bnfold`` runs the command line."""

from bnfold.cli.main import main

main()
