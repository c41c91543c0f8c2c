from smartdiff.cli import main

raise SystemExit(main())
