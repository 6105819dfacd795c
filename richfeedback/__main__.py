from richfeedback.cli import main

raise SystemExit(main())
