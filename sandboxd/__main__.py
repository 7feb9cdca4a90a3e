from sandboxd.cli import main

raise SystemExit(main())
