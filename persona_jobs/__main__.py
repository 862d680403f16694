from persona_jobs.cli import main

raise SystemExit(main())
