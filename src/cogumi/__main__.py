from cogumi.cli import main

raise SystemExit(main())
