"""``python -m ifedicl.cli ...`` is ``ifedicl ...`` (what tests and child processes run)."""

from ifedicl.cli.main import main

main()
