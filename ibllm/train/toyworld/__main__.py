"""``python -m ibllm.train.toyworld``: write a toy-world data set (or time the renderers)."""

from ibllm.train.toyworld.cli import main

raise SystemExit(main())
