from loraedit.cli import main

raise SystemExit(main())
