from streamtrack.cli import main

raise SystemExit(main())
