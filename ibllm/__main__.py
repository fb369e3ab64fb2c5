from ibllm.cli import main

raise SystemExit(main())
