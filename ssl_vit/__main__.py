from ssl_vit.cli import main

raise SystemExit(main())
