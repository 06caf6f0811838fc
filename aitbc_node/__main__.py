"""`python -m aitbc_node` is the same as the `aitbc-node` command."""

from aitbc_node.cli import main

raise SystemExit(main())
